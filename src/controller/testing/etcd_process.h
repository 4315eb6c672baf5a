// Test-only: a real etcd (Debian's etcd-server) on loopback ports with a throwaway data directory,
// started by the tests that need one (controller stores, controllers' leader failover) and killed
// when the object goes. Not linked into product binaries.
#pragma once

#include <sys/types.h>

#include <string>

namespace ferry::controller::testing {

class EtcdProcess {
 public:
  EtcdProcess();
  ~EtcdProcess();
  EtcdProcess(const EtcdProcess&) = delete;
  EtcdProcess& operator=(const EtcdProcess&) = delete;
  // Starts etcd and waits until it answers (at most 20 s). False with why() on failure.
  bool Start();
  void Kill();
  const std::string& url() const { return url_; }  // http://127.0.0.1:PORT
  const std::string& why() const { return why_; }

 private:
  std::string dir_, url_, why_;
  pid_t pid_ = -1;
};

}  // namespace ferry::controller::testing
