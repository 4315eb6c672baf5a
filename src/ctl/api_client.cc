#include "ctl/api_client.h"

#include <sys/socket.h>
#include <sys/stat.h>

#include <httplib.h>

namespace ferry::ctl {

Result<nlohmann::json> ApiClient::Get(const std::string& target) const { return Do("GET", target, nullptr); }

Result<nlohmann::json> ApiClient::Put(const std::string& target, const nlohmann::json& body) const {
  return Do("PUT", target, &body);
}

Result<nlohmann::json> ApiClient::Do(const std::string& method, const std::string& target, const nlohmann::json* body) const {
  struct stat st;
  if (stat(path_.c_str(), &st) != 0)
    return Errorf(ErrorCode::kNotFound, "API socket {}: {}", path_, std::strerror(errno));
  if (!S_ISSOCK(st.st_mode)) return Errorf(ErrorCode::kInvalidArgument, "API socket {}: not a socket", path_);
  httplib::Client cli(path_);
  cli.set_address_family(AF_UNIX);
  cli.set_connection_timeout(0, timeout_ms_ * 1000);
  cli.set_read_timeout(timeout_ms_ / 1000, (timeout_ms_ % 1000) * 1000);
  cli.set_write_timeout(timeout_ms_ / 1000, (timeout_ms_ % 1000) * 1000);
  httplib::Result r = method == "GET" ? cli.Get(target) : cli.Put(target, body->dump(), "application/json");
  if (!r) return Errorf(ErrorCode::kIo, "{} {} via {}: {}", method, target, path_, httplib::to_string(r.error()));
  auto j = nlohmann::json::parse(r->body, nullptr, false);
  if (r->status >= 400) {
    std::string msg = (!j.is_discarded() && j.is_object() && j.contains("error") && j["error"].is_string())
                          ? j["error"].get<std::string>()
                          : r->body;
    ErrorCode code = r->status == 404 ? ErrorCode::kNotFound
                     : r->status == 409 ? ErrorCode::kBusy
                     : r->status < 500  ? ErrorCode::kInvalidArgument
                                        : ErrorCode::kInternal;
    return Errorf(code, "{} {}: HTTP {}: {}", method, target, r->status, msg);
  }
  if (j.is_discarded()) return Errorf(ErrorCode::kCorrupt, "{} {}: response is not JSON", method, target);
  return j;
}

}  // namespace ferry::ctl
