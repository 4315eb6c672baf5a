// ferry-vmm: boot (or restore) one VM and serve its API.
#include <signal.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "vmm/api_server.h"
#include "migration/engine/destination.h"
#include "vmm/cli.h"
#include "vmm/migration.h"
#include "vmm/snapshot.h"
#include "vmm/vm.h"

namespace {
// After a post-copy failure (the guest halted, the process must exit): how long GET /vm and
// GET /vm/migration keep reporting the failure before the process exits with code 3.
constexpr int kFailedLingerMs = 3000;
}  // namespace

int main(int argc, char** argv) {
  // Logs go to stderr so the guest console can own stdout.
  spdlog::set_default_logger(spdlog::stderr_color_mt("ferry-vmm"));
  auto cl = ferry::ParseVmmCommandLine(argc, argv);
  if (!cl) {
    if (cl.error().code() == ferry::ErrorCode::kCancelled) {
      std::fputs(cl.error().message().c_str(), stdout);
      return 0;
    }
    std::fprintf(stderr, "ferry-vmm: %s\n", cl.error().message().c_str());
    return 2;
  }
  spdlog::set_level(spdlog::level::from_str(cl->log_level));
  signal(SIGPIPE, SIG_IGN);

  // Block the shutdown signals before any thread starts (they are taken by sigwait below).
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR2);  // used below to stop the signal thread
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  // SIGINT/SIGTERM: abort an incoming migration while waiting for it, later an orderly
  // shutdown through the machine thread.
  std::mutex on_signal_mu;
  std::function<void()> on_signal = [] { std::exit(1); };
  auto set_on_signal = [&](std::function<void()> f) {
    std::lock_guard<std::mutex> l(on_signal_mu);
    on_signal = std::move(f);
  };
  std::thread sig([&] {
    int signo;
    if (sigwait(&set, &signo) == 0 && signo != SIGUSR2) {
      std::lock_guard<std::mutex> l(on_signal_mu);
      on_signal();
    }
  });
  struct JoinSig {
    std::thread& t;
    ~JoinSig() {
      pthread_kill(t.native_handle(), SIGUSR2);
      t.join();
    }
  } join_sig{sig};

  if (!cl->api_socket.empty()) {
    if (auto c = ferry::ApiServer::CheckPath(cl->api_socket); !c) {
      std::fprintf(stderr, "ferry-vmm: %s\n", c.error().message().c_str());
      return 2;
    }
  }

  // Declared in this order so the API server (last) goes first: its handlers use the others.
  std::optional<ferry::SnapshotClaim> claim;  // --restore: the snapshot this process runs
  std::unique_ptr<ferry::Vm> vm;
  std::unique_ptr<ferry::VmMigrationManager> migrations;
  std::unique_ptr<ferry::migration::IncomingMigration> incoming;
  std::optional<ferry::VmMigrationTarget> target;
  std::unique_ptr<ferry::ApiServer> api;
  bool started = false;
  if (!cl->incoming.empty()) {
    // Destination of a live migration: the VM is built from the stream and runs on GO. The API
    // answers from the moment we listen (progress, cancel before GO); the VM joins it afterwards.
    ferry::migration::IncomingSecurity security;
    security.allow_plaintext = cl->allow_plaintext;
    if (!cl->tls.empty()) {
      auto tls = ferry::net::TlsContext::Create(true, cl->tls, cl->tls_allow);
      if (!tls) {
        std::fprintf(stderr, "ferry-vmm: --incoming %s: %s\n", cl->incoming.c_str(), tls.error().message().c_str());
        return 1;
      }
      security.tls = std::move(*tls);
    }
    auto in = ferry::migration::IncomingMigration::Listen(cl->incoming, std::move(security));
    if (!in) {
      std::fprintf(stderr, "ferry-vmm: %s\n", in.error().message().c_str());
      return 1;
    }
    incoming = std::move(*in);
    if (!cl->api_socket.empty()) {
      auto a = ferry::ApiServer::StartIncoming(cl->api_socket, incoming.get());
      if (!a) {
        // Nothing has arrived yet: fail now rather than receive a VM nobody can operate.
        std::fprintf(stderr, "ferry-vmm: %s\n", a.error().message().c_str());
        return 1;
      }
      api = std::move(*a);
    }
    spdlog::info("waiting for an incoming migration on {} (port {})", cl->incoming, incoming->port());
    target.emplace(cl->vm, cl->max_mem, cl->incoming_paused);
    set_on_signal([inc = incoming.get()] { inc->Abort(); });
    ferry::migration::IncomingParams params;
    params.recover_timeout_ms = cl->recover_timeout_ms;
    auto r = incoming->Run(&*target, params);
    if (!r && incoming->guest_started()) {
      // Post-copy failed after the guest started here: pages it has not received exist only on
      // the source. It must never run on with them missing, and tearing the machine down would
      // wait for vCPUs that wait for those pages: halt the vCPU (without waiting for the machine
      // thread), let the API report phase "failed" with the reason for a bounded time, then stop
      // the process.
      set_on_signal([] { _exit(3); });
      if (ferry::Vm* v = target->vm()) v->Halt("incoming migration failed after GO: " + r.error().message());
      std::fprintf(stderr, "ferry-vmm: failed: %s; the guest is stopped (it cannot run without the pages the source still holds)\n",
                   r.error().message().c_str());
      if (api) {
        std::fprintf(stderr, "ferry-vmm: the API reports the failure for %d ms, then the process exits\n", kFailedLingerMs);
        std::fflush(stderr);
        std::this_thread::sleep_for(std::chrono::milliseconds(kFailedLingerMs));
      }
      std::fflush(stderr);
      _exit(3);
    }
    set_on_signal([] { std::exit(1); });
    if (!r) {
      // The prepared machine (if any) is torn down with `target`.
      std::fprintf(stderr, "ferry-vmm: %s\n", r.error().message().c_str());
      return 1;
    }
    spdlog::info("incoming migration {} from {}: {} pages in {} batches, restore {:.2f} ms, resume {:.2f} ms, total {:.0f} ms",
                 r->uuid, r->source, r->pages, r->batches, r->restore_ms, r->resume_ms, r->total_ms);
    if (r->postcopy_ms > 0)
      spdlog::info("incoming migration {}: post-copy of {} pages in {:.1f} ms, {} demand faults (p50 {} us, p99 {} us)", r->uuid,
                   r->postcopy_missing, r->postcopy_ms, r->faults.demand_faults, r->faults.p50_us, r->faults.p99_us);
    vm = target->TakeVm();
    started = true;
  } else {
    if (!cl->restore.empty() && !cl->restore_clone) {
      // One running copy per snapshot: held until this process ends.
      auto c = ferry::SnapshotClaim::Acquire(cl->restore);
      if (!c) {
        std::fprintf(stderr, "ferry-vmm: %s\n", c.error().message().c_str());
        return 1;
      }
      claim.emplace(std::move(*c));
    } else if (cl->restore_clone) {
      cl->vm.generation_id = ferry::migration::FormatUuid(ferry::migration::NewUuid());
      spdlog::warn("restoring '{}' as a clone with the new generation id {}: the guest keeps everything else, its MAC address "
                   "included - on the original's network segment the two copies conflict",
                   cl->restore, cl->vm.generation_id);
    }
    auto v = cl->restore.empty() ? ferry::Vm::Create(cl->vm) : ferry::Vm::Restore(cl->vm, cl->restore);
    if (!v) {
      std::fprintf(stderr, "ferry-vmm: %s\n", v.error().message().c_str());
      return 1;
    }
    vm = std::move(*v);
  }
  migrations = std::make_unique<ferry::VmMigrationManager>(vm.get());
  if (api) {
    // Same socket, no gap: from now on the API serves the migrated VM.
    api->AttachVm(vm.get(), migrations.get());
  } else {
    // The machine runs before the API socket appears, so a client that sees the socket always
    // finds a running VM (never a "not started" window right after boot or restore).
    auto s = started ? ferry::Status{} : vm->Start();
    if (!s) {
      std::fprintf(stderr, "ferry-vmm: %s\n", s.error().message().c_str());
      return 1;
    }
    if (!cl->api_socket.empty()) {
      auto a = ferry::ApiServer::Start(cl->api_socket, vm.get(), migrations.get());
      if (!a) {
        std::fprintf(stderr, "ferry-vmm: %s\n", a.error().message().c_str());
        (void)vm->Shutdown();
        (void)vm->Wait();
        return 1;
      }
      api = std::move(*a);
    }
  }
  set_on_signal([&] { (void)vm->Shutdown(); });
  int code = vm->Wait();
  set_on_signal([] {});
  api.reset();
  return code;
}
