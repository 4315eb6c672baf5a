// "http://HOST:PORT" and "https://HOST:PORT" (IPv6 literals in brackets; an optional trailing
// slash, nothing else): the base URLs of agents and controllers. Pure, any thread.
#pragma once

#include <string>

#include "common/error.h"

namespace ferry::net {

struct HttpUrl {
  bool tls = false;  // https
  std::string host;  // without brackets
  int port = 0;
};

// kInvalidArgument naming `s` and the expected form.
Result<HttpUrl> ParseHttpUrl(const std::string& s);

}  // namespace ferry::net
