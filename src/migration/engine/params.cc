#include "migration/engine/params.h"

#include <algorithm>

#include "common/json.h"
#include "common/size.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

uint64_t DefaultDeltaCache(uint64_t ram_bytes) { return std::min<uint64_t>(ram_bytes / 4, 256ull << 20) / 4096 * 4096; }

std::string_view ModeName(MigrationMode m) {
  switch (m) {
    case MigrationMode::kAuto: return "auto";
    case MigrationMode::kPrecopy: return "precopy";
    case MigrationMode::kPostcopy: return "postcopy";
  }
  return "?";
}

Status LoadTls(SourceParams* p) {
  auto ep = ParseEndpoint(p->to);
  if (!ep) return std::unexpected(ep.error());
  if (!ep->tls) {
    if (!p->tls.empty() || !p->tls_server_name.empty())
      return Errorf(ErrorCode::kInvalidArgument, "TLS settings were given but \"to\" is '{}': use tls:HOST:PORT", p->to);
    p->tls_context = nullptr;
    return {};
  }
  if (p->tls.cert.empty() || p->tls.key.empty() || p->tls.ca.empty())
    return Errorf(ErrorCode::kInvalidArgument, "\"to\" is '{}': TLS needs \"tls_cert\", \"tls_key\" and \"tls_ca\" (ferry migrate --tls-cert, --tls-key, --tls-ca)", p->to);
  auto ctx = net::TlsContext::Create(false, p->tls);
  if (!ctx) return std::unexpected(ctx.error());
  p->tls_context = std::move(*ctx);
  return {};
}

Result<SourceParams> ParseSourceParams(const nlohmann::json& body) {
  if (!body.is_object()) return Errorf(ErrorCode::kInvalidArgument, "request body must be a JSON object");
  SourceParams p;
  auto get_uint = [&](const std::string& key, uint64_t lo, uint64_t hi, uint64_t* out) -> Status {
    auto x = JsonUint(body[key], key, lo, hi);
    if (!x) return std::unexpected(x.error());
    *out = *x;
    return {};
  };
  bool have_to = false;
  for (auto& [k, v] : body.items()) {
    uint64_t x = 0;
    if (k == "to") {
      if (!v.is_string()) return Errorf(ErrorCode::kInvalidArgument, "\"to\" must be a string like tcp:HOST:PORT");
      p.to = v.get<std::string>();
      auto ep = ParseEndpoint(p.to);
      if (!ep) return std::unexpected(ep.error());
      if (ep->host.empty() || ep->port == 0) return Errorf(ErrorCode::kInvalidArgument, "\"to\": '{}' needs a host and a port", p.to);
      have_to = true;
    } else if (k == "tls_cert" || k == "tls_key" || k == "tls_ca" || k == "tls_server_name") {
      if (!v.is_string() || v.get<std::string>().empty()) return Errorf(ErrorCode::kInvalidArgument, "\"{}\" must be a non-empty string", k);
      (k == "tls_cert" ? p.tls.cert : k == "tls_key" ? p.tls.key : k == "tls_ca" ? p.tls.ca : p.tls_server_name) = v.get<std::string>();
    } else if (k == "mode") {
      const std::string m = v.is_string() ? v.get<std::string>() : "";
      if (m == "auto") p.mode = MigrationMode::kAuto;
      else if (m == "precopy") p.mode = MigrationMode::kPrecopy;
      else if (m == "postcopy") p.mode = MigrationMode::kPostcopy;
      else return Errorf(ErrorCode::kInvalidArgument, "\"mode\" must be \"auto\", \"precopy\" or \"postcopy\"");
    } else if (k == "recover_timeout_ms") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 1000, 3600000, &x), "migrate");
      p.recover_timeout_ms = static_cast<int>(x);
    } else if (k == "channels") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 1, kMaxChannels, &x), "migrate");
      p.channels = static_cast<uint32_t>(x);
    } else if (k == "downtime_ms") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 1, 600000, &x), "migrate");
      p.downtime_ms = x;
    } else if (k == "max_bandwidth") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 0, UINT64_MAX / 1000000000ull, &x), "migrate");
      if (x != 0 && x < 65536) return Errorf(ErrorCode::kInvalidArgument, "\"max_bandwidth\" is in bytes/s; {} is below the minimum of 65536 (0 = unlimited)", x);
      p.max_bandwidth = x;
    } else if (k == "max_iterations") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 1, 10000, &x), "migrate");
      p.max_iterations = static_cast<uint32_t>(x);
    } else if (k == "stall_rounds") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 1, 1000, &x), "migrate");
      p.stall_rounds = static_cast<uint32_t>(x);
    } else if (k == "converge_policy") {
      std::string s = v.is_string() ? v.get<std::string>() : "";
      if (s == "force") p.policy = ConvergePolicy::kForce;
      else if (s == "fail") p.policy = ConvergePolicy::kFail;
      else if (s == "continue") p.policy = ConvergePolicy::kContinue;
      else return Errorf(ErrorCode::kInvalidArgument, "\"converge_policy\" must be \"force\", \"fail\" or \"continue\"");
    } else if (k == "compress") {
      if (!v.is_string()) return Errorf(ErrorCode::kInvalidArgument, "\"compress\" must be a string: auto, none, lz4, zstd or zstd:LEVEL");
      auto m = ParseCompressMode(v.get<std::string>());
      if (!m) return std::unexpected(m.error());
      p.compress = *m;
    } else if (k == "delta_cache") {
      // Bytes, as a number or a size string ("64M"); 0 turns deltas off.
      uint64_t bytes = 0;
      if (v.is_string()) {
        auto s = ParseSize(v.get<std::string>());
        if (!s) return std::unexpected(s.error().WithContext("\"delta_cache\""));
        bytes = *s;
      } else {
        FERRY_RETURN_IF_ERROR(get_uint(k, 0, UINT64_MAX, &bytes), "migrate");
      }
      if (bytes > (64ull << 30)) return Errorf(ErrorCode::kInvalidArgument, "\"delta_cache\" of {} bytes is above the 64 GiB limit", bytes);
      if (bytes != 0 && bytes < (1u << 20))
        return Errorf(ErrorCode::kInvalidArgument, "\"delta_cache\" of {} bytes is below the 1 MiB minimum (0 = off)", bytes);
      p.delta_cache = static_cast<int64_t>(bytes);
    } else if (k == "layering") {
      if (v.is_boolean()) p.layering = v.get<bool>();
      else if (v.is_string() && v.get<std::string>() == "on") p.layering = true;
      else if (v.is_string() && v.get<std::string>() == "off") p.layering = false;
      else return Errorf(ErrorCode::kInvalidArgument, "\"layering\" must be \"on\" or \"off\"");
    } else if (k == "throttle") {
      if (v.is_boolean()) p.throttle = v.get<bool>();
      else if (v.is_string() && v.get<std::string>() == "on") p.throttle = true;
      else if (v.is_string() && v.get<std::string>() == "off") p.throttle = false;
      else return Errorf(ErrorCode::kInvalidArgument, "\"throttle\" must be \"on\" or \"off\"");
    } else if (k == "stall_timeout_ms") {
      FERRY_RETURN_IF_ERROR(get_uint(k, 1000, 600000, &x), "migrate");
      p.stall_timeout_ms = static_cast<int>(x);
    } else if (k == "protocol_version") {
      FERRY_RETURN_IF_ERROR(get_uint(k, kMinProtocolVersion, kProtocolVersion, &x), "migrate");
      p.max_protocol_version = static_cast<uint32_t>(x);
    } else {
      return Errorf(ErrorCode::kInvalidArgument, "unknown field \"{}\"", k);
    }
  }
  if (!have_to) return Errorf(ErrorCode::kInvalidArgument, "\"to\" (tcp:HOST:PORT or tls:HOST:PORT) is required");
  FERRY_RETURN_IF_ERROR(LoadTls(&p), "migrate");
  return p;
}

}  // namespace ferry::migration
