// Parameters of a source migration, as the operator gives them (PUT /vm/migrate body, `ferry
// migrate` flags). Parsing is strict: unknown fields and out-of-range values are errors.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "migration/codec/codec_selector.h"
#include "migration/engine/policy.h"
#include "migration/protocol/wire.h"
#include "net/tls.h"

namespace ferry::migration {

// auto: pre-copy that switches to post-copy by itself when it would not reach a small pause in
// reasonable time (and the destination can do post-copy); precopy: never post-copy (the
// converge policy decides); postcopy: one pre-copy pass, then post-copy.
enum class MigrationMode { kAuto, kPrecopy, kPostcopy };
std::string_view ModeName(MigrationMode m);

struct SourceParams {
  std::string to;                 // tcp:HOST:PORT or tls:HOST:PORT
  // "tls_cert", "tls_key", "tls_ca" (PEM files the VMM reads): required with tls:, refused with
  // tcp:. "tls_server_name": the name the destination's certificate must carry (default: HOST).
  net::TlsFiles tls;
  std::string tls_server_name;
  // Loaded from `tls` by ParseSourceParams (a client context; null for tcp:). Every connection of
  // the migration (control, data, post-copy reconnects) uses it.
  std::shared_ptr<const net::TlsContext> tls_context;
  MigrationMode mode = MigrationMode::kAuto;  // "mode": auto | precopy | postcopy
  uint32_t channels = 4;          // data connections (1..16)
  uint64_t downtime_ms = 300;     // target VMM downtime
  uint64_t max_bandwidth = 0;     // bytes/s over all channels while the guest runs, 0 = unlimited
                                  // (the stop-and-copy goes at full speed, as in QEMU; the
                                  // post-copy push is limited, pages the guest waits for are not)
  // Not converging = the remaining dirty set did not shrink by 10% for `stall_rounds`
  // rounds. force: stop-and-copy anyway (reports the expected downtime); fail: give up
  // (source keeps running); continue: keep iterating up to max_iterations, then fail.
  ConvergePolicy policy = ConvergePolicy::kForce;
  uint32_t max_iterations = 30;
  uint32_t stall_rounds = 5;
  // Data reduction (defaults: everything that pays off).
  CompressMode compress;             // "compress": auto | none | lz4 | zstd[:LEVEL]
  int64_t delta_cache = -1;          // "delta_cache" bytes; 0 = off; -1 = default (DefaultDeltaCache)
  bool layering = true;              // "layering": on | off
  // "throttle": on | off. Mode precopy slows the vCPUs when the guest outruns the link (only as
  // much as convergence needs; full speed again at the pause). Off: converge_policy alone decides.
  bool throttle = true;
  uint32_t max_protocol_version = kProtocolVersion;  // "protocol_version": speak at most this version
  // Post-copy: how long the source tries to reach the destination again after a cut connection
  // ("recover_timeout_ms"); PUT /vm/migration/recover may give a new address meanwhile.
  int recover_timeout_ms = 60000;
  int liveness_timeout_ms = 3000;  // post-copy: unacknowledged data for this long = cut
  // "stall_timeout_ms": before post-copy, a migration connection whose sent data stays
  // unacknowledged, or whose peer stops answering keepalives, this long fails the migration (the
  // source resumes its VM) - a destination host that vanishes during the stop-and-copy no longer
  // leaves the source paused for the ~15 minutes of TCP retransmissions.
  int stall_timeout_ms = 10000;
  int connect_timeout_ms = 5000;
  int reply_timeout_ms = 60000;   // CONFIG_ACK, READY, RESUMED
};

// The delta cache a migration of `ram_bytes` uses by default: a quarter of guest RAM, at most
// 256 MiB (enough to hold the pages a workload re-dirties; QEMU's XBZRLE default is 64 MiB).
uint64_t DefaultDeltaCache(uint64_t ram_bytes);

// Checks the TLS settings against `to` and loads p->tls_context from p->tls (kInvalidArgument
// naming the flag or file at fault). ParseSourceParams calls it.
Status LoadTls(SourceParams* p);

// From the JSON body of PUT /vm/migrate; strict (unknown fields rejected).
Result<SourceParams> ParseSourceParams(const nlohmann::json& body);

}  // namespace ferry::migration
