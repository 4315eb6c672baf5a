#include "controller/kv_store.h"

#include "controller/sqlite_kv.h"

namespace ferry::controller {

Result<std::unique_ptr<KvStore>> OpenKvStore(const std::string& spec) {
  if (spec.starts_with("sqlite:")) {
    auto kv = SqliteKv::Open(spec.substr(7));
    if (!kv) return std::unexpected(kv.error());
    return std::unique_ptr<KvStore>(std::move(*kv));
  }
  if (spec.starts_with("etcd:"))
    return Errorf(ErrorCode::kUnsupported, "--store {}: the etcd store is not built yet (use sqlite:PATH)", spec);
  return Errorf(ErrorCode::kInvalidArgument, "--store '{}': expected sqlite:PATH or etcd:URL[,URL...]", spec);
}

}  // namespace ferry::controller
