#include "ctl/commands.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/size.h"
#include "ctl/api_client.h"
#include "ctl/cluster.h"
#include "ctl/progress.h"

namespace ferry::ctl {
namespace {

std::atomic<bool> g_interrupted{false};  // set by SIGINT/SIGTERM during `ferry migrate`
extern "C" void OnInterrupt(int) { g_interrupted.store(true); }

bool IsFinal(const std::string& s) {
  return s == "completed" || s == "failed" || s == "cancelled" || s == "failed-unknown";
}

int Fail(const Error& e) {
  std::fprintf(stderr, "ferry: %s\n", e.message().c_str());
  return 1;
}

void PrintJson(const nlohmann::json& j) { std::printf("%s\n", j.dump(2).c_str()); }

struct MigrateOptions {
  std::string to;
  std::string mode;             // auto|precopy|postcopy; empty: server default (auto)
  uint32_t channels = 0;        // 0: server default
  uint32_t downtime_ms = 0;     // 0: server default
  std::string max_bandwidth;    // bytes/s with k/M/G suffix; empty: unlimited
  std::string converge_policy;  // empty: server default
  uint32_t max_iterations = 0;
  std::string compress;     // auto|none|lz4|zstd[:LEVEL]; empty: server default (auto)
  std::string delta_cache;  // SIZE, 0 = off; empty: server default
  std::string layering;     // on|off; empty: server default (on)
  std::string throttle;     // on|off; empty: server default (on; mode precopy only)
  uint32_t protocol_version = 0;
  uint32_t recover_timeout_ms = 0;  // 0: server default (60 s)
  uint32_t stall_timeout_ms = 0;    // 0: server default (10 s)
  std::string tls_cert, tls_key, tls_ca, tls_server_name;  // --to tls: (paths made absolute: the VMM reads them)
  bool keep_source = false;
  bool no_progress = false;
  double poll_s = 0.2;
};

int Migrate(const ApiClient& api, const MigrateOptions& o, bool json) {
  nlohmann::json body = {{"to", o.to}};
  if (!o.mode.empty()) body["mode"] = o.mode;
  if (o.channels) body["channels"] = o.channels;
  if (o.downtime_ms) body["downtime_ms"] = o.downtime_ms;
  if (!o.max_bandwidth.empty()) {
    auto bw = ParseSize(o.max_bandwidth);
    if (!bw) return Fail(bw.error().WithContext("--max-bandwidth"));
    body["max_bandwidth"] = *bw;
  }
  if (!o.converge_policy.empty()) body["converge_policy"] = o.converge_policy;
  if (o.max_iterations) body["max_iterations"] = o.max_iterations;
  if (!o.compress.empty()) body["compress"] = o.compress;
  if (!o.delta_cache.empty()) {
    auto sz = ParseSize(o.delta_cache);
    if (!sz) return Fail(sz.error().WithContext("--delta-cache"));
    body["delta_cache"] = *sz;
  }
  if (!o.layering.empty()) body["layering"] = o.layering;
  if (!o.throttle.empty()) body["throttle"] = o.throttle;
  if (o.protocol_version) body["protocol_version"] = o.protocol_version;
  if (o.recover_timeout_ms) body["recover_timeout_ms"] = o.recover_timeout_ms;
  if (o.stall_timeout_ms) body["stall_timeout_ms"] = o.stall_timeout_ms;
  for (const auto& [key, path] : {std::pair{"tls_cert", o.tls_cert}, {"tls_key", o.tls_key}, {"tls_ca", o.tls_ca}}) {
    if (path.empty()) continue;
    std::error_code ec;
    const auto abs = std::filesystem::absolute(path, ec);
    body[key] = ec ? path : abs.string();
  }
  if (!o.tls_server_name.empty()) body["tls_server_name"] = o.tls_server_name;
  if (auto r = api.Put("/vm/migrate", body); !r) return Fail(r.error());

  // Ctrl-C asks the source to cancel; we keep polling until it reports a final status.
  struct sigaction sa = {};
  sa.sa_handler = OnInterrupt;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  const bool tty = isatty(STDERR_FILENO) == 1;
  const bool progress = !o.no_progress;
  bool cancel_sent = false;
  auto last_line = std::chrono::steady_clock::now() - std::chrono::hours(1);
  nlohmann::json st;
  int poll_errors = 0;
  for (;;) {
    if (g_interrupted.load() && !cancel_sent) {
      cancel_sent = true;
      std::fprintf(stderr, "%sferry: interrupted, cancelling the migration\n", tty && progress ? "\n" : "");
      if (auto r = api.Put("/vm/migration/cancel"); !r) std::fprintf(stderr, "ferry: %s\n", r.error().message().c_str());
    }
    auto r = api.Get("/vm/migration");
    if (!r) {
      // The source VMM is the authority; a few transient failures are tolerated.
      if (++poll_errors >= 25) return Fail(r.error().WithContext("lost the source VMM"));
    } else {
      poll_errors = 0;
      st = std::move(*r);
      const std::string status = st.value("status", "");
      auto now = std::chrono::steady_clock::now();
      if (progress && (tty || now - last_line >= std::chrono::seconds(2) || IsFinal(status))) {
        if (tty) std::fprintf(stderr, "\r\033[K%s", FormatProgressLine(st).c_str());
        else std::fprintf(stderr, "%s\n", FormatProgressLine(st).c_str());
        last_line = now;
      }
      if (IsFinal(status)) break;
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(o.poll_s));
  }
  if (progress && tty) std::fprintf(stderr, "\n");
  const bool ok = st.value("status", "") == "completed";
  if (ok && !o.keep_source) {
    // The source VM is paused in state "migrated"; its process has no more work.
    if (auto r = api.Put("/vm/shutdown"); !r)
      std::fprintf(stderr, "ferry: warning: could not shut the source down: %s\n", r.error().message().c_str());
  }
  if (json) PrintJson(st);
  else std::printf("%s", FormatSummary(st).c_str());
  if (!ok) {
    std::fprintf(stderr, "ferry: migration %s%s%s\n", st.value("status", "?").c_str(),
                 st.contains("error") ? ": " : "", st.value("error", "").c_str());
    if (st.value("status", "") == "failed-unknown")
      std::fprintf(stderr,
                   "ferry: the destination may or may not be running the VM; the source stays paused "
                   "(check the destination, then `ferry resume` the source only if it is not running there)\n");
  }
  return ok ? 0 : 1;
}

int Status(const ApiClient& api, bool json) {
  auto vm = api.Get("/vm");
  if (!vm) return Fail(vm.error());
  auto mig = api.Get("/vm/migration");
  if (json) {
    nlohmann::json out = {{"vm", *vm}};
    out["migration"] = mig ? *mig : nlohmann::json(nullptr);
    PrintJson(out);
    return 0;
  }
  std::printf("vm: %s\n", vm->value("state", "?").c_str());
  if (vm->contains("config") && (*vm)["config"].is_object()) {
    const auto& c = (*vm)["config"];
    if (auto m = c.find("ram_bytes"); m != c.end() && m->is_number_unsigned())
      std::printf("  memory: %llu MiB\n", static_cast<unsigned long long>(m->get<uint64_t>() >> 20));
  }
  if (auto e = vm->find("error"); e != vm->end() && e->is_string()) std::printf("  error: %s\n", e->get<std::string>().c_str());
  if (mig) {
    const std::string s = mig->value("status", "");
    if (mig->value("role", "") == "destination") std::printf("%s", FormatIncoming(*mig).c_str());
    else if (IsFinal(s)) std::printf("%s", FormatSummary(*mig).c_str());
    else std::printf("%s\n", FormatProgressLine(*mig).c_str());
  } else if (mig.error().code() == ErrorCode::kNotFound) {
    std::printf("migration: none\n");
  } else {
    std::printf("migration: %s\n", mig.error().message().c_str());
  }
  return 0;
}

int Simple(const ApiClient& api, const std::string& target, const nlohmann::json& body, bool json) {
  auto r = api.Put(target, body);
  if (!r) return Fail(r.error());
  if (json) PrintJson(*r);
  return 0;
}

}  // namespace

int RunCli(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);  // a server that hangs up mid-request (TLS) is an error of that request
  CLI::App app{"ferry: operate Ferry VMs (live migration, status, lifecycle) and the cluster (ferry cluster ...)"};
  app.require_subcommand(1);
  std::string socket;
  bool json = false;
  int timeout_ms = 5000;
  auto add_common = [&](CLI::App* c) {
    c->add_option("--api-socket", socket, "the VMM's API socket (ferry-vmm --api-socket)")->required();
    c->add_flag("--json", json, "machine-readable output on stdout");
    c->add_option("--timeout-ms", timeout_ms, "per-request timeout")->check(CLI::Range(100, 600000));
  };

  MigrateOptions mo;
  auto* migrate = app.add_subcommand("migrate", "live-migrate the VM to a destination started with --incoming");
  add_common(migrate);
  migrate->add_option("--to", mo.to,
                      "destination: tls:HOST:PORT (mutual TLS 1.3, with --tls-cert, --tls-key, --tls-ca) or tcp:HOST:PORT (plaintext)")
      ->required();
  migrate->add_option("--tls-cert", mo.tls_cert, "with --to tls: this host's certificate (PEM)");
  migrate->add_option("--tls-key", mo.tls_key, "with --to tls: the certificate's private key (PEM)");
  migrate->add_option("--tls-ca", mo.tls_ca, "with --to tls: the CA the destination's certificate must chain to (PEM)");
  migrate->add_option("--tls-server-name", mo.tls_server_name,
                      "with --to tls: the name the destination's certificate must carry (default: HOST of --to)");
  migrate->add_option("--mode", mo.mode,
                      "auto (default: pre-copy, switching to post-copy by itself when pre-copy would not converge), precopy, "
                      "postcopy (one pre-copy pass, then post-copy)")
      ->check(CLI::IsMember({"auto", "precopy", "postcopy"}));
  migrate->add_option("--channels", mo.channels, "parallel data channels (default 4)")->check(CLI::Range(1, 16));
  migrate->add_option("--downtime-ms", mo.downtime_ms, "downtime target (default 300)")->check(CLI::Range(1, 600000));
  migrate->add_option("--max-bandwidth", mo.max_bandwidth, "rate limit in bytes/s (k/M/G suffixes; default unlimited)");
  migrate->add_option("--converge-policy", mo.converge_policy, "when pre-copy does not converge: force|fail|continue")
      ->check(CLI::IsMember({"force", "fail", "continue"}));
  migrate->add_option("--max-iterations", mo.max_iterations, "cap on pre-copy rounds")->check(CLI::Range(1, 100000));
  migrate->add_option("--compress", mo.compress, "page compression: auto (default: chosen per batch from link and CPU), none, lz4, zstd[:LEVEL]");
  migrate->add_option("--delta-cache", mo.delta_cache,
                      "cache of sent pages for delta encoding of re-sent pages, e.g. 64M; 0 = off (default: 1/4 of guest RAM, at most 256M)");
  migrate->add_option("--layering", mo.layering, "hold back pages that keep being dirtied until the final round: on (default) | off")
      ->check(CLI::IsMember({"on", "off"}));
  migrate->add_option("--throttle", mo.throttle,
                      "mode precopy: slow the guest's vCPUs when it outruns the link, only as much as needed: on (default) | off")
      ->check(CLI::IsMember({"on", "off"}));
  migrate->add_option("--protocol-version", mo.protocol_version, "speak at most this migration protocol version (default: the newest)")
      ->check(CLI::Range(1, 2));
  migrate->add_option("--recover-timeout-ms", mo.recover_timeout_ms,
                      "post-copy: how long to keep reconnecting after the connection was cut (default 60000)")
      ->check(CLI::Range(1000, 3600000));
  migrate->add_option("--stall-timeout-ms", mo.stall_timeout_ms,
                      "before GO: give up (the source resumes) when the destination stops acknowledging or answering "
                      "for this long (default 10000)")
      ->check(CLI::Range(1000, 600000));
  migrate->add_flag("--keep-source", mo.keep_source, "leave the (paused, migrated) source process running after success");
  migrate->add_flag("--no-progress", mo.no_progress, "no progress output on stderr");

  auto* status = app.add_subcommand("status", "show the VM state and the current/last migration");
  add_common(status);
  auto* cancel = app.add_subcommand("cancel", "cancel the running migration (the source keeps running)");
  add_common(cancel);
  auto* postcopy = app.add_subcommand("migrate-postcopy", "switch the running migration to post-copy now (as QEMU's migrate-start-postcopy)");
  add_common(postcopy);
  std::string recover_to;
  auto* recover = app.add_subcommand("migrate-recover", "a post-copy migration whose connection was cut: reconnect to this destination address");
  add_common(recover);
  recover->add_option("--to", recover_to, "the destination, tcp:HOST:PORT (tls:HOST:PORT for a TLS migration: its certificates are kept)")->required();
  auto* pause = app.add_subcommand("pause", "pause the VM");
  add_common(pause);
  auto* resume = app.add_subcommand("resume", "resume the VM");
  add_common(resume);
  auto* shutdown = app.add_subcommand("shutdown", "stop the VM and its VMM process");
  add_common(shutdown);
  std::string snap_path;
  auto* snapshot = app.add_subcommand("snapshot", "write the VM's state and RAM to a file");
  add_common(snapshot);
  snapshot->add_option("--path", snap_path, "snapshot file")->required();

  auto cluster = AddClusterCommands(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (cluster->parsed()) return cluster->Run();
  ApiClient api(socket, timeout_ms);
  if (migrate->parsed()) return Migrate(api, mo, json);
  if (status->parsed()) return Status(api, json);
  if (cancel->parsed()) return Simple(api, "/vm/migration/cancel", nlohmann::json::object(), json);
  if (postcopy->parsed()) return Simple(api, "/vm/migration/postcopy", nlohmann::json::object(), json);
  if (recover->parsed()) return Simple(api, "/vm/migration/recover", {{"to", recover_to}}, json);
  if (pause->parsed()) return Simple(api, "/vm/pause", nlohmann::json::object(), json);
  if (resume->parsed()) return Simple(api, "/vm/resume", nlohmann::json::object(), json);
  if (shutdown->parsed()) return Simple(api, "/vm/shutdown", nlohmann::json::object(), json);
  if (snapshot->parsed()) return Simple(api, "/vm/snapshot", {{"path", snap_path}}, json);
  return 2;
}

}  // namespace ferry::ctl
