// HTTP/1.1 + JSON client for a VMM's API socket (AF_UNIX), used by the `ferry` CLI.
// Every call returns the decoded JSON body, or an Error carrying the server's
// {"error": ...} message and the HTTP status.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace ferry::ctl {

class ApiClient {
 public:
  explicit ApiClient(std::string socket_path, int timeout_ms = 5000)
      : path_(std::move(socket_path)), timeout_ms_(timeout_ms) {}

  Result<nlohmann::json> Get(const std::string& target) const;
  Result<nlohmann::json> Put(const std::string& target, const nlohmann::json& body = nlohmann::json::object()) const;
  const std::string& path() const { return path_; }

 private:
  Result<nlohmann::json> Do(const std::string& method, const std::string& target, const nlohmann::json* body) const;
  std::string path_;
  int timeout_ms_;
};

}  // namespace ferry::ctl
