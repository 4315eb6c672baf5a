#include "net/testing/pki.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <cstdio>
#include <memory>

namespace ferry::net::testing {
namespace {

struct Free {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
  void operator()(X509* x) const { X509_free(x); }
  void operator()(FILE* f) const { std::fclose(f); }
};
using Key = std::unique_ptr<EVP_PKEY, Free>;
using Cert = std::unique_ptr<X509, Free>;

Status WritePem(const std::string& path, EVP_PKEY* key, X509* cert) {
  std::unique_ptr<FILE, Free> f(std::fopen(path.c_str(), "w"));
  if (!f) return ErrnoError("create " + path);
  const bool ok = key ? PEM_write_PrivateKey(f.get(), key, nullptr, nullptr, 0, nullptr, nullptr) == 1 : PEM_write_X509(f.get(), cert) == 1;
  if (!ok) return Errorf(ErrorCode::kIo, "write {}: {}", path, OpenSslErrors());
  return {};
}

Result<Key> ReadKey(const std::string& path) {
  std::unique_ptr<FILE, Free> f(std::fopen(path.c_str(), "r"));
  if (!f) return ErrnoError("open " + path);
  Key k(PEM_read_PrivateKey(f.get(), nullptr, nullptr, nullptr));
  if (!k) return Errorf(ErrorCode::kCorrupt, "read {}: {}", path, OpenSslErrors());
  return k;
}

Result<Cert> ReadCert(const std::string& path) {
  std::unique_ptr<FILE, Free> f(std::fopen(path.c_str(), "r"));
  if (!f) return ErrnoError("open " + path);
  Cert c(PEM_read_X509(f.get(), nullptr, nullptr, nullptr));
  if (!c) return Errorf(ErrorCode::kCorrupt, "read {}: {}", path, OpenSslErrors());
  return c;
}

Status AddExt(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (!ext) return Errorf(ErrorCode::kInvalidArgument, "extension {}={}: {}", OBJ_nid2sn(nid), value, OpenSslErrors());
  const int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (ok != 1) return Errorf(ErrorCode::kInternal, "add extension: {}", OpenSslErrors());
  return {};
}

// A certificate for `key`, signed by issuer_key (issuer null: self-signed).
Result<Cert> Build(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key, long from_s, long until_s, bool ca,
                   const std::string& san) {
  static long serial = 1;
  Cert c(X509_new());
  X509_set_version(c.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c.get()), serial++);
  X509_gmtime_adj(X509_getm_notBefore(c.get()), from_s);
  X509_gmtime_adj(X509_getm_notAfter(c.get()), until_s);
  X509_set_pubkey(c.get(), key);
  X509_NAME* name = X509_get_subject_name(c.get());
  if (!cn.empty()) X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(c.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509* iss = issuer ? issuer : c.get();
  FERRY_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE"), "certificate");
  FERRY_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_key_usage, ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature"), "certificate");
  FERRY_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_subject_key_identifier, "hash"), "certificate");
  if (!ca) FERRY_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_ext_key_usage, "serverAuth,clientAuth"), "certificate");
  if (!san.empty()) FERRY_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_subject_alt_name, san), "certificate");
  if (X509_sign(c.get(), issuer_key ? issuer_key : key, EVP_sha256()) <= 0) return Errorf(ErrorCode::kInternal, "sign: {}", OpenSslErrors());
  return c;
}

}  // namespace

Status TestPki::MakeCa(const std::string& name) {
  Key key(EVP_EC_gen("P-256"));
  if (!key) return Errorf(ErrorCode::kInternal, "EC key: {}", OpenSslErrors());
  auto cert = Build(key.get(), name, nullptr, nullptr, -3600, 30 * 86400, true, "");
  if (!cert) return std::unexpected(cert.error());
  FERRY_RETURN_IF_ERROR(WritePem(Path(name + ".key"), key.get(), nullptr), "CA");
  return WritePem(Path(name + ".crt"), nullptr, cert->get());
}

Status TestPki::MakeCert(const std::string& name, const CertSpec& spec) {
  auto ca_key = ReadKey(Path(spec.ca + ".key"));
  if (!ca_key) return std::unexpected(ca_key.error());
  auto ca_cert = ReadCert(Path(spec.ca + ".crt"));
  if (!ca_cert) return std::unexpected(ca_cert.error());
  Key key(EVP_EC_gen("P-256"));
  if (!key) return Errorf(ErrorCode::kInternal, "EC key: {}", OpenSslErrors());
  std::string san;
  for (const auto& d : spec.dns) san += (san.empty() ? "" : ",") + std::string("DNS:") + d;
  for (const auto& ip : spec.ips) san += (san.empty() ? "" : ",") + std::string("IP:") + ip;
  auto cert = Build(key.get(), spec.cn, ca_cert->get(), ca_key->get(), spec.valid_from_s, spec.valid_until_s, false, san);
  if (!cert) return std::unexpected(cert.error());
  FERRY_RETURN_IF_ERROR(WritePem(Path(name + ".key"), key.get(), nullptr), name);
  return WritePem(Path(name + ".crt"), nullptr, cert->get());
}

TlsFiles TestPki::Files(const std::string& name, const std::string& ca) const {
  return {Path(name + ".crt"), Path(name + ".key"), Path(ca + ".crt")};
}

Status TestPki::MakeStandard() {
  FERRY_RETURN_IF_ERROR(MakeCa("ca"), "pki");
  FERRY_RETURN_IF_ERROR(MakeCa("rogue"), "pki");
  CertSpec server;
  server.cn = "server";
  server.dns = {"localhost"};
  server.ips = {"127.0.0.1", "::1"};
  FERRY_RETURN_IF_ERROR(MakeCert("server", server), "pki");
  const auto spec = [](std::string ca, std::string cn, std::string dns) {
    CertSpec s;
    s.ca = std::move(ca);
    s.cn = std::move(cn);
    s.dns = {std::move(dns)};
    return s;
  };
  FERRY_RETURN_IF_ERROR(MakeCert("client", spec("ca", "client", "client.test")), "pki");
  FERRY_RETURN_IF_ERROR(MakeCert("other", spec("ca", "other", "other.test")), "pki");
  FERRY_RETURN_IF_ERROR(MakeCert("evil", spec("rogue", "client", "client.test")), "pki");
  CertSpec expired = spec("ca", "client", "client.test");
  expired.valid_from_s = -7200;
  expired.valid_until_s = -3600;
  return MakeCert("expired", expired);
}

}  // namespace ferry::net::testing
