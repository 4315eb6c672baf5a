// ferry-vmm: boot (or restore) one VM and serve its API.
#include <signal.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "vmm/api_server.h"
#include "migration/engine/destination.h"
#include "vmm/cli.h"
#include "vmm/migration.h"
#include "vmm/vm.h"

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

  ferry::Result<std::unique_ptr<ferry::Vm>> vm = std::unexpected(ferry::Error(ferry::ErrorCode::kInternal, "no VM"));
  bool started = false;
  if (!cl->incoming.empty()) {
    // Destination of a live migration: the VM is built from the stream and runs on GO.
    auto in = ferry::migration::IncomingMigration::Listen(cl->incoming);
    if (!in) {
      std::fprintf(stderr, "ferry-vmm: %s\n", in.error().message().c_str());
      return 1;
    }
    spdlog::info("waiting for an incoming migration on {} (port {})", cl->incoming, (*in)->port());
    ferry::VmMigrationTarget target(cl->vm);
    set_on_signal([inc = in->get()] { inc->Abort(); });
    ferry::migration::IncomingParams params;
    params.recover_timeout_ms = cl->recover_timeout_ms;
    auto r = (*in)->Run(&target, params);
    set_on_signal([] { std::exit(1); });
    if (!r && (*in)->guest_started()) {
      // Post-copy failed after the guest started here: pages it has not received exist only on
      // the source. It must never run on with them missing, and tearing the machine down would
      // wait for vCPUs that wait for those pages: stop the process now.
      std::fprintf(stderr, "ferry-vmm: failed: %s; the guest is stopped (it cannot run without the pages the source still holds)\n",
                   r.error().message().c_str());
      std::fflush(stderr);
      _exit(3);
    }
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
    vm = target.TakeVm();
    started = true;
  } else {
    vm = cl->restore.empty() ? ferry::Vm::Create(cl->vm) : ferry::Vm::Restore(cl->vm, cl->restore);
  }
  if (!vm) {
    std::fprintf(stderr, "ferry-vmm: %s\n", vm.error().message().c_str());
    return 1;
  }
  ferry::VmMigrationManager migrations(vm->get());
  // The machine runs before the API socket appears, so a client that sees the socket always
  // finds a running VM (never a "not started" window right after boot or restore).
  auto s = started ? ferry::Status{} : (*vm)->Start();
  if (!s) {
    std::fprintf(stderr, "ferry-vmm: %s\n", s.error().message().c_str());
    return 1;
  }
  std::unique_ptr<ferry::ApiServer> api;
  if (!cl->api_socket.empty()) {
    auto a = ferry::ApiServer::Start(cl->api_socket, vm->get(), &migrations);
    if (!a && !cl->incoming.empty()) {
      // This VM is the only copy now (the source has handed it over): keep it running
      // without an API rather than lose it.
      spdlog::error("{}; the migrated VM keeps running without an API socket", a.error().message());
    } else if (!a) {
      std::fprintf(stderr, "ferry-vmm: %s\n", a.error().message().c_str());
      (void)(*vm)->Shutdown();
      (void)(*vm)->Wait();
      return 1;
    } else {
      api = std::move(*a);
    }
  }
  set_on_signal([&] { (void)(*vm)->Shutdown(); });
  int code = (*vm)->Wait();
  set_on_signal([] {});
  api.reset();
  return code;
}
