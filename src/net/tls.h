// TLS 1.3 with mutual authentication for Ferry's network connections: the migration channels
// (migration/transport/tcp.h) and the WAN gateway pair (gateway/conn.h) load their certificates
// and judge their peers here, so both follow one policy.
//
// Policy: TLS 1.3 only. Both sides present a certificate that chains to the configured CA
// (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT; OpenSSL checks the validity dates); no
// session resumption and no tickets (every connection is a full handshake). On top of that:
//   - a server may accept only peers whose certificate names one of an allow-list (CheckPeer:
//     X509_check_host, i.e. a SAN DNS name, or the subject CN when the certificate has none);
//   - a client may insist that the server's certificate is for the host it dialled
//     (ExpectServerName: a DNS name, or an IP address literal matched against SAN IP entries).
// Errors name the reason OpenSSL gives for a refused certificate ("certificate has expired",
// "unable to get local issuer certificate", ...), not just "handshake failed".
//
// Threads: a TlsContext is immutable after Create and may be shared by any number of connections
// on any threads. The free functions act on one SSL object, which its owner serializes.
#pragma once

#include <openssl/ssl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"

namespace ferry::net {

struct TlsFiles {
  std::string cert, key, ca;  // PEM: certificate chain, its private key, the CA peers must chain to
  bool empty() const { return cert.empty() && key.empty() && ca.empty(); }
};

// Owns an SSL_CTX. A null ctx() means plaintext (the gateway's --insecure).
class TlsContext {
 public:
  // server: the accepting side. allowed_peers (servers only): certificate names accepted; empty =
  // any certificate from the CA. kInvalidArgument names the file that could not be used.
  static Result<std::shared_ptr<TlsContext>> Create(bool server, const TlsFiles& files, std::vector<std::string> allowed_peers = {});
  static std::shared_ptr<TlsContext> Insecure() { return std::shared_ptr<TlsContext>(new TlsContext(nullptr, false, {})); }
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  SSL_CTX* ctx() const { return ctx_; }
  bool server() const { return server_; }
  const std::vector<std::string>& allowed_peers() const { return allowed_; }
  // After a completed handshake: OK when the allow-list is empty or the peer's certificate names
  // one of its entries; else kPermissionDenied naming the peer's certificate.
  Status CheckPeer(SSL* ssl) const;

 private:
  TlsContext(SSL_CTX* c, bool server, std::vector<std::string> allowed) : ctx_(c), server_(server), allowed_(std::move(allowed)) {}
  SSL_CTX* ctx_;
  bool server_;
  std::vector<std::string> allowed_;
};

// Applies the policy above (TLS 1.3 only, our certificate and key, peers verified against the CA and
// required to present a certificate, no resumption) to a context made elsewhere, e.g. by an HTTP
// library (ferry-agent's HTTPS server and client). TlsContext::Create uses it too.
Status ConfigureContext(SSL_CTX* ctx, const TlsFiles& files);

// Attaches socket `fd` (not owned) to `ssl` for both directions, through a socket BIO whose writes
// use send(MSG_NOSIGNAL): a peer that reset the connection is an error (EPIPE), never a SIGPIPE
// that ends the process, whatever the process does with that signal.
Status AttachSocket(SSL* ssl, int fd);
// Runs the TLS handshake of `ssl` (attached to non-blocking socket `fd`) as the server or the client,
// waiting for the socket in slices of at most 50 ms, until `deadline_ns` (common/clock.h NowNs) or
// until *cancel (if given) is set. Errors: kTimeout, kCancelled, kIo (the connection ended),
// kPermissionDenied (the handshake failed: HandshakeError's reason, with a hint when the other side
// does not speak TLS). `what` names the peer in messages.
Status RunHandshake(SSL* ssl, int fd, bool server, uint64_t deadline_ns, const std::atomic<bool>* cancel, const std::string& what);
// Client side, before the handshake: the server's certificate must be for `name` (a DNS name,
// also sent as SNI, or an IPv4/IPv6 literal).
Status ExpectServerName(SSL* ssl, const std::string& name);
// The peer certificate's subject CN, else its first SAN DNS name ("" without a certificate); for logs.
std::string PeerCertName(SSL* ssl);
// Why a handshake on `ssl` failed: the certificate verdict when the peer's certificate was
// refused, else OpenSSL's queued errors (drained).
std::string HandshakeError(SSL* ssl);
// OpenSSL's queued errors of this thread, drained ("unknown TLS error" when none).
std::string OpenSslErrors();

}  // namespace ferry::net
