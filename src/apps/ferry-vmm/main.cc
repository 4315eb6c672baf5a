// ferry-vmm: boot (or restore) one VM and serve its API.
#include <signal.h>

#include <cstdio>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "vmm/api_server.h"
#include "vmm/cli.h"
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

  auto vm = cl->restore.empty() ? ferry::Vm::Create(cl->vm) : ferry::Vm::Restore(cl->vm, cl->restore);
  if (!vm) {
    std::fprintf(stderr, "ferry-vmm: %s\n", vm.error().message().c_str());
    return 1;
  }
  std::unique_ptr<ferry::ApiServer> api;
  if (!cl->api_socket.empty()) {
    auto a = ferry::ApiServer::Start(cl->api_socket, vm->get());
    if (!a) {
      std::fprintf(stderr, "ferry-vmm: %s\n", a.error().message().c_str());
      return 1;
    }
    api = std::move(*a);
  }
  // SIGINT/SIGTERM: orderly shutdown through the machine thread.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR2);  // used below to stop the signal thread
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  auto s = (*vm)->Start();
  if (!s) {
    std::fprintf(stderr, "ferry-vmm: %s\n", s.error().message().c_str());
    return 1;
  }
  std::thread sig([&] {
    int signo;
    if (sigwait(&set, &signo) == 0 && signo != SIGUSR2) (void)(*vm)->Shutdown();
  });
  int code = (*vm)->Wait();
  pthread_kill(sig.native_handle(), SIGUSR2);
  sig.join();
  api.reset();
  return code;
}
