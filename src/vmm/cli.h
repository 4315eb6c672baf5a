// ferry-vmm command line (CLI11) -> VmOptions, with clear errors on bad values.
#pragma once

#include <string>
#include <vector>

#include "common/error.h"
#include "common/size.h"
#include "net/tls.h"
#include "vmm/vm.h"

namespace ferry {

struct VmmCommandLine {
  VmOptions vm;
  std::string api_socket;
  std::string restore;
  // --restore-clone FILE: restore without claiming the snapshot (another copy may run) and with a
  // new VM identity (generation id). restore holds FILE then too.
  bool restore_clone = false;
  std::string incoming;  // tls:ADDR:PORT or tcp:ADDR:PORT
  net::TlsFiles tls;                   // --tls-cert/--tls-key/--tls-ca (incoming tls: only)
  std::vector<std::string> tls_allow;  // --tls-allow NAME...: accepted source certificate names
  bool allow_plaintext = false;        // --allow-plaintext: tcp: on a non-loopback address
  int recover_timeout_ms = 60000;  // --incoming: post-copy waits this long for a cut source to return
  // --incoming: the most guest RAM an incoming CONFIG may ask for (--max-mem; default: this host's
  // physical memory).
  uint64_t max_mem = 0;
  // --incoming-paused: the migrated guest stays paused after the migration (PUT /vm/resume runs it),
  // e.g. to check or snapshot what arrived before it runs.
  bool incoming_paused = false;
  std::string log_level = "info";
};

// Parses "tap=NAME[,mac=MAC]".
Status ParseNetSpec(const std::string& s, BoardConfig* board);
// Full parse; on --help returns kCancelled with the help text as message.
Result<VmmCommandLine> ParseVmmCommandLine(int argc, const char* const* argv);

}  // namespace ferry
