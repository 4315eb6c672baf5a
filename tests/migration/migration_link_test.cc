// Live migration over a real bandwidth-capped link: two network namespaces joined by a veth
// pair with a 1 Gbit/s tbf qdisc on both ends; the source VMM lives in one, the destination in
// the other. memdirty runs at 20k pages/s (about 650 Mbit/s of fresh pages).
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "migration_util.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;

class VethLink {
 public:
  explicit VethLink(const std::string& tag) : a_("fla" + tag), b_("flb" + tag) {
    Sh("ip netns del " + a_ + " 2>/dev/null; ip netns del " + b_ + " 2>/dev/null");
    const std::string ea = "ip netns exec " + a_ + " ", eb = "ip netns exec " + b_ + " ";
    ok_ = Sh("ip netns add " + a_) == 0 && Sh("ip netns add " + b_) == 0 &&
          Sh("ip link add fvetha netns " + a_ + " type veth peer name fvethb netns " + b_) == 0 &&
          Sh(ea + "ip addr add 10.78.0.1/24 dev fvetha") == 0 && Sh(eb + "ip addr add 10.78.0.2/24 dev fvethb") == 0 &&
          Sh(ea + "ip link set fvetha up") == 0 && Sh(eb + "ip link set fvethb up") == 0 &&
          Sh(ea + "ip link set lo up") == 0 && Sh(eb + "ip link set lo up") == 0 &&
          Sh(ea + "tc qdisc add dev fvetha root tbf rate 1gbit burst 256kb latency 20ms") == 0 &&
          Sh(eb + "tc qdisc add dev fvethb root tbf rate 1gbit burst 256kb latency 20ms") == 0;
  }
  ~VethLink() { Sh("ip netns del " + a_ + " 2>/dev/null; ip netns del " + b_ + " 2>/dev/null"); }
  bool ok() const { return ok_; }
  const std::string& a() const { return a_; }
  const std::string& b() const { return b_; }

 private:
  std::string a_, b_;
  bool ok_ = false;
};

TEST(MigrationLink, CompletesOver1GbitTbfAt20kPagesPerSecond) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root for network namespaces";
  struct stat st;
  ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
  const std::string dir = MakeTempDir("miglink");
  {
    VethLink link(std::to_string(getpid() % 100000));
    ASSERT_TRUE(link.ok());
    VmProcess src({"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline",
                   "console=ttyS0 ferry.run=memdirty:mib=128,rate=20000,bytes=4096,verify=0"},
                  dir, link.a());
    ASSERT_TRUE(src.Start());
    ASSERT_TRUE(src.WaitConsole("memdirty started", 15s)) << src.Console() << src.Stderr();
    const int port = 7300 + getpid() % 1000;
    VmProcess dst({"--incoming", "tcp:10.78.0.2:" + std::to_string(port), "--allow-plaintext"}, dir, link.b());
    ASSERT_TRUE(dst.Start());
    std::this_thread::sleep_for(2s);
    auto r = Ferry("migrate --api-socket " + src.socket() + " --to tcp:10.78.0.2:" + std::to_string(port) + " --json --no-progress",
                   link.a());
    ASSERT_EQ(r.rc, 0) << r.out << src.Stderr() << dst.Stderr();
    std::printf("migration over 1 Gbit/s tbf: %s\n", r.json.dump().c_str());
    EXPECT_EQ(r.json["status"], "completed");
    // The link is really capped: the first round alone moves 128 MiB of fresh pages.
    EXPECT_LT(r.json["mbps"].get<double>(), 1100.0) << r.out;
    ASSERT_TRUE(MemverifyOk(dst, 128 * 256)) << dst.Console() << dst.Stderr();
    EXPECT_EQ(dst.Console().find("FAIL"), std::string::npos);
    EXPECT_EQ(dst.Api("PUT", "/vm/shutdown", "{}"), 200);
    EXPECT_EQ(dst.Wait(10s), 0);
  }
  RemoveTree(dir);
}

}  // namespace
}  // namespace ferry::test
