#include "vmm/cli.h"

#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

namespace ferry {

Status ParseNetSpec(const std::string& s, BoardConfig* board) {
  std::string rest = s;
  while (!rest.empty()) {
    size_t comma = rest.find(',');
    std::string item = rest.substr(0, comma);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    size_t eq = item.find('=');
    if (eq == std::string::npos) return Errorf(ErrorCode::kInvalidArgument, "--net: '{}' is not key=value", item);
    std::string k = item.substr(0, eq), v = item.substr(eq + 1);
    if (k == "tap") {
      if (v.empty() || v.size() > 15) return Errorf(ErrorCode::kInvalidArgument, "--net: bad TAP name '{}'", v);
      board->tap = v;
    } else if (k == "mac") {
      auto m = ParseMac(v);
      if (!m) return std::unexpected(m.error().WithContext("--net"));
      board->mac = *m;
    } else {
      return Errorf(ErrorCode::kInvalidArgument, "--net: unknown key '{}' (expected tap=NAME[,mac=MAC])", k);
    }
  }
  if (board->tap.empty()) return Errorf(ErrorCode::kInvalidArgument, "--net needs tap=NAME");
  return {};
}

Result<VmmCommandLine> ParseVmmCommandLine(int argc, const char* const* argv) {
  VmmCommandLine cl;
  CLI::App app{"ferry-vmm: a VMM with a software RV64GC CPU and the QEMU virt board"};
  std::string mem = "256M", net, cmdline;
  app.add_option("--kernel", cl.vm.board.kernel, "Linux RISC-V Image");
  app.add_option("--initrd", cl.vm.board.initrd, "initramfs (cpio)");
  app.add_option("--mem", mem, "guest RAM, e.g. 256M or 1G")->capture_default_str();
  app.add_option("--cmdline", cmdline, "kernel command line (default: console=ttyS0 earlycon=sbi)");
  app.add_option("--console", cl.vm.console, "stdio | file:PATH | none")->capture_default_str();
  app.add_option("--api-socket", cl.api_socket, "Unix socket for the HTTP/JSON API");
  app.add_option("--net", net, "virtio-net on a TAP: tap=NAME[,mac=MAC]");
  app.add_option("--disk", cl.vm.board.disk, "virtio-blk raw disk image");
  app.add_flag("--balloon", cl.vm.board.balloon, "virtio-balloon with free page reporting");
  std::string clone;
  app.add_option("--restore", cl.restore,
                 "restore a snapshot file instead of booting; this process then holds a claim on the snapshot (FILE.claim) and a "
                 "second --restore of it while this copy runs is refused");
  app.add_option("--restore-clone", clone,
                 "restore a snapshot file as a clone: no claim (the original may run too), a new VM identity (generation_id in GET "
                 "/vm); the guest keeps everything else, its MAC address included: give the clone its own network segment");
  app.add_option("--incoming", cl.incoming,
                 "wait for a live migration on tls:ADDR:PORT (mutual TLS: --tls-cert, --tls-key, --tls-ca) or tcp:ADDR:PORT "
                 "(plaintext: loopback only unless --allow-plaintext) instead of booting");
  app.add_option("--tls-cert", cl.tls.cert, "with --incoming tls: this host's certificate (PEM)");
  app.add_option("--tls-key", cl.tls.key, "with --incoming tls: the certificate's private key (PEM)");
  app.add_option("--tls-ca", cl.tls.ca, "with --incoming tls: the CA a source's certificate must chain to (PEM)");
  app.add_option("--tls-allow", cl.tls_allow,
                 "with --incoming tls: accept only sources whose certificate names NAME (a SAN DNS name or the CN); repeatable");
  app.add_flag("--allow-plaintext", cl.allow_plaintext,
               "with --incoming tcp: listen on an address other than loopback without authentication or encryption");
  app.add_option("--recover-timeout-ms", cl.recover_timeout_ms,
                 "with --incoming: how long post-copy waits for a source whose connection was cut to reconnect")
      ->check(CLI::Range(1000, 3600000))
      ->capture_default_str();
  std::string max_mem;
  app.add_option("--max-mem", max_mem,
                 "with --incoming: the most guest RAM a source may bring, e.g. 4G (default: this host's physical memory)");
  app.add_flag("--incoming-paused", cl.incoming_paused,
               "with --incoming: the guest stays paused after the migration until PUT /vm/resume (to check or snapshot what "
               "arrived first; the MAC is announced at the switchover all the same)");
  app.add_option("--log-level", cl.log_level, "trace|debug|info|warn|error")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    return Errorf(ErrorCode::kCancelled, "{}", app.help());
  } catch (const CLI::ParseError& e) {
    return Errorf(ErrorCode::kInvalidArgument, "{}", e.what());
  }
  if (!clone.empty()) {
    if (!cl.restore.empty()) return Errorf(ErrorCode::kInvalidArgument, "--restore and --restore-clone: give one of them");
    cl.restore = clone;
    cl.restore_clone = true;
  }
  auto size = ParseSize(mem);
  if (!size) return std::unexpected(size.error().WithContext("--mem"));
  cl.vm.board.ram_bytes = *size;
  if (!cmdline.empty()) cl.vm.board.cmdline = cmdline;
  if (!net.empty()) FERRY_RETURN_IF_ERROR(ParseNetSpec(net, &cl.vm.board), "command line");
  if (!cl.incoming.empty()) {
    if (!cl.restore.empty() || !cl.vm.board.kernel.empty() || !cl.vm.board.initrd.empty() || !cmdline.empty() || mem != "256M")
      return Errorf(ErrorCode::kInvalidArgument, "--incoming takes the VM configuration from the migration stream: do not pass --kernel/--initrd/--cmdline/--mem/--restore/--restore-clone");
    if (!cl.incoming.starts_with("tcp:") && !cl.incoming.starts_with("tls:"))
      return Errorf(ErrorCode::kInvalidArgument, "--incoming: '{}' must look like tls:ADDR:PORT or tcp:ADDR:PORT", cl.incoming);
    const bool tls = cl.incoming.starts_with("tls:");
    if (tls && (cl.tls.cert.empty() || cl.tls.key.empty() || cl.tls.ca.empty()))
      return Errorf(ErrorCode::kInvalidArgument, "--incoming {}: TLS needs --tls-cert, --tls-key and --tls-ca", cl.incoming);
    if (!tls && (!cl.tls.empty() || !cl.tls_allow.empty()))
      return Errorf(ErrorCode::kInvalidArgument, "--incoming {}: --tls-* options are for tls:ADDR:PORT", cl.incoming);
    if (tls && cl.allow_plaintext)
      return Errorf(ErrorCode::kInvalidArgument, "--allow-plaintext is for --incoming tcp:ADDR:PORT, not tls:");
    if (!max_mem.empty()) {
      auto m = ParseSize(max_mem);
      if (!m) return std::unexpected(m.error().WithContext("--max-mem"));
      if (*m < kMinRam) return Errorf(ErrorCode::kInvalidArgument, "--max-mem: {} bytes is below the smallest guest ({} MiB)", *m, kMinRam >> 20);
      cl.max_mem = *m;
    } else {
      const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
      cl.max_mem = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : kMaxRam;
    }
  } else if (!max_mem.empty()) {
    return Errorf(ErrorCode::kInvalidArgument, "--max-mem limits what an incoming migration may bring: use it with --incoming");
  } else if (cl.incoming_paused) {
    return Errorf(ErrorCode::kInvalidArgument, "--incoming-paused is for --incoming (a booted or restored VM: PUT /vm/pause)");
  } else if (!cl.tls.empty() || !cl.tls_allow.empty() || cl.allow_plaintext) {
    return Errorf(ErrorCode::kInvalidArgument,
                  "--tls-* and --allow-plaintext secure an incoming migration: use them with --incoming (an outgoing "
                  "migration takes its certificates from `ferry migrate --tls-*`)");
  } else if (!cl.restore.empty()) {
    if (!cl.vm.board.kernel.empty() || !cl.vm.board.initrd.empty() || !cmdline.empty())
      return Errorf(ErrorCode::kInvalidArgument, "--restore takes the kernel, initrd and cmdline from the snapshot: do not pass --kernel/--initrd/--cmdline");
  } else if (cl.vm.board.kernel.empty()) {
    return Errorf(ErrorCode::kInvalidArgument, "--kernel is required (or --restore FILE)");
  }
  struct stat st;
  for (const auto& [flag, path] : {std::pair{"--kernel", cl.vm.board.kernel}, {"--initrd", cl.vm.board.initrd},
                                   {"--disk", cl.vm.board.disk}, {"--restore", cl.restore}})
    if (!path.empty() && stat(path.c_str(), &st) != 0)
      return Errorf(ErrorCode::kNotFound, "{}: '{}' does not exist", flag, path);
  if (spdlog::level::from_str(cl.log_level) == spdlog::level::off && cl.log_level != "off")
    return Errorf(ErrorCode::kInvalidArgument, "--log-level: unknown level '{}'", cl.log_level);
  return cl;
}

}  // namespace ferry
