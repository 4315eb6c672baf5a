#include "controller/kv_store.h"

#include "controller/etcd_kv.h"
#include "controller/sqlite_kv.h"

namespace ferry::controller {

std::string KeyPrefixEnd(std::string prefix) {
  while (!prefix.empty()) {
    if (static_cast<unsigned char>(prefix.back()) != 0xff) {
      prefix.back() = static_cast<char>(prefix.back() + 1);
      return prefix;
    }
    prefix.pop_back();
  }
  return {};
}

Result<std::unique_ptr<KvStore>> OpenKvStore(const std::string& spec) {
  if (spec.starts_with("sqlite:")) {
    auto kv = SqliteKv::Open(spec.substr(7));
    if (!kv) return std::unexpected(kv.error());
    return std::unique_ptr<KvStore>(std::move(*kv));
  }
  if (spec.starts_with("etcd:")) {
    std::vector<std::string> urls;
    std::string rest = spec.substr(5);
    for (size_t at = 0; at <= rest.size();) {
      const size_t comma = std::min(rest.find(',', at), rest.size());
      if (comma > at) urls.push_back(rest.substr(at, comma - at));
      at = comma + 1;
    }
    auto kv = EtcdKv::Open(urls);
    if (!kv) return std::unexpected(kv.error());
    return std::unique_ptr<KvStore>(std::move(*kv));
  }
  return Errorf(ErrorCode::kInvalidArgument, "--store '{}': expected sqlite:PATH or etcd:URL[,URL...]", spec);
}

}  // namespace ferry::controller
