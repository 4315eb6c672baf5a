// Throwaway PKI for tests: CAs and certificates made with OpenSSL's API (EC P-256, SHA-256) into
// a directory, with exactly the properties a test needs - subject CN, SAN DNS names and IP
// addresses, validity window relative to now (an expired certificate is one whose window ended).
// Test-only (library ferry_net_testing); nothing in a product binary links it.
//
// Threads: one TestPki per test; its methods are not thread-safe. Files: DIR/NAME.crt and
// DIR/NAME.key (PEM); the directory belongs to the caller.
#pragma once

#include <string>
#include <vector>

#include "common/error.h"
#include "net/tls.h"

namespace ferry::net::testing {

struct CertSpec {
  std::string ca = "ca";           // the issuing CA (made with MakeCa)
  std::string cn;                  // subject CN (empty: none)
  std::vector<std::string> dns;    // SAN DNS names
  std::vector<std::string> ips;    // SAN IP addresses
  long valid_from_s = -3600;       // notBefore, seconds from now
  long valid_until_s = 2 * 86400;  // notAfter, seconds from now (negative: already expired)
};

class TestPki {
 public:
  explicit TestPki(std::string dir) : dir_(std::move(dir)) {}
  // A self-signed CA: DIR/NAME.crt, DIR/NAME.key.
  Status MakeCa(const std::string& name);
  // A certificate for `name` signed by spec.ca (client and server use).
  Status MakeCert(const std::string& name, const CertSpec& spec);
  // The files of certificate `name` with trust anchor `ca`.
  TlsFiles Files(const std::string& name, const std::string& ca = "ca") const;
  std::string Path(const std::string& file) const { return dir_ + "/" + file; }

  // The usual set: CAs "ca" and "rogue"; "server" (CN server, DNS localhost, IP 127.0.0.1 and
  // ::1), "client" (CN client, DNS client.test), "other" (CN other, DNS other.test), all from
  // "ca"; "evil" (CN client, from "rogue"); "expired" (CN client, from "ca", ended an hour ago).
  Status MakeStandard();

 private:
  std::string dir_;
};

}  // namespace ferry::net::testing
