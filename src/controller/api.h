// ferry-controller's REST+JSON API (docs/api.md) over HTTP, or HTTPS with mutual TLS
// (net/tls.h's policy: TLS 1.3, a client certificate chained to the CA is required):
//   POST /v1/hosts, GET /v1/hosts, POST /v1/hosts/NAME/drain, POST /v1/hosts/NAME/undrain,
//   POST /v1/vms, GET /v1/vms, GET /v1/vms/NAME/console, DELETE /v1/vms/NAME,
//   GET /v1/migrations, GET /v1/events, GET /v1/plan, GET /v1/status, GET /metrics, GET /.
// Errors are {"error": "..."} with 400 (malformed request), 404 (no such host, VM or endpoint),
// 409 (a name taken, a host full or not active), 502 (an agent did not answer) or 500.
// Threads: httplib's worker threads call the Controller, which is thread-safe.
#pragma once

#include <memory>

#include "common/error.h"
#include "controller/controller.h"
#include "net/tls.h"

namespace httplib { class Server; }

namespace ferry::controller {

// tls empty: plain HTTP.
Result<std::unique_ptr<httplib::Server>> MakeApiServer(Controller& controller, const net::TlsFiles& tls);

int HttpStatusFor(const Error& e);

}  // namespace ferry::controller
