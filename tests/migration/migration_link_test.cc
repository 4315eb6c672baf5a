// Live migration over a real bandwidth-capped link: two network namespaces joined by a veth
// pair with a 1 Gbit/s tbf qdisc on both ends; the source VMM lives in one, the destination in
// the other. memdirty runs at 20k pages/s (about 650 Mbit/s of fresh pages). Each end of the veth
// is a port of a bridge in its namespace, with the VMM's TAP on the same bridge: the guest's echo
// service answers a 1 kHz probe across the same capped link the migration uses, from the source's
// side before and from the destination's after. The migration must converge (pre-copy, stopped by
// the policy within the downtime target, not forced) and the pause and the service's silence
// must stay within that target.
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
          Sh(ea + "ip link add br0 type bridge") == 0 && Sh(eb + "ip link add br0 type bridge") == 0 &&
          Sh(ea + "ip link set fvetha master br0") == 0 && Sh(eb + "ip link set fvethb master br0") == 0 &&
          Sh(ea + "ip addr add 10.78.0.1/24 dev br0") == 0 && Sh(eb + "ip addr add 10.78.0.2/24 dev br0") == 0 &&
          Sh(ea + "ip link set br0 up") == 0 && Sh(eb + "ip link set br0 up") == 0 &&
          Sh(ea + "ip link set fvetha up") == 0 && Sh(eb + "ip link set fvethb up") == 0 &&
          Sh(ea + "ip link set lo up") == 0 && Sh(eb + "ip link set lo up") == 0 &&
          Sh(ea + "tc qdisc add dev fvetha root tbf rate 1gbit burst 256kb latency 20ms") == 0 &&
          Sh(eb + "tc qdisc add dev fvethb root tbf rate 1gbit burst 256kb latency 20ms") == 0;
  }
  ~VethLink() { Sh("ip netns del " + a_ + " 2>/dev/null; ip netns del " + b_ + " 2>/dev/null"); }
  bool ok() const { return ok_; }
  // A TAP on namespace `ns`'s bridge.
  bool AddTap(const std::string& ns, const std::string& tap) {
    const std::string e = "ip netns exec " + ns + " ";
    return Sh(e + "ip tuntap add dev " + tap + " mode tap vnet_hdr") == 0 && Sh(e + "ip link set " + tap + " master br0") == 0 &&
           Sh(e + "ip link set " + tap + " up") == 0;
  }
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
    ASSERT_TRUE(link.AddTap(link.a(), "flsrc"));
    ASSERT_TRUE(link.AddTap(link.b(), "fldst"));
    VmProcess src({"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--net", "tap=flsrc,mac=52:54:00:12:34:5a",
                   "--cmdline",
                   "console=ttyS0 ferry.ip=10.78.0.10/24 ferry.run=memdirty:mib=128,rate=20000,bytes=4096,verify=0;echo:port=7"},
                  dir, link.a());
    ASSERT_TRUE(src.Start());
    ASSERT_TRUE(src.WaitConsole("memdirty started", 15s)) << src.Console() << src.Stderr();
    const int port = 7300 + getpid() % 1000;
    VmProcess dst({"--incoming", "tcp:10.78.0.2:" + std::to_string(port), "--allow-plaintext", "--net", "tap=fldst"}, dir, link.b());
    ASSERT_TRUE(dst.Start());
    std::this_thread::sleep_for(2s);
    UdpProbe probe(link.a(), "10.78.0.10:7", dir);
    std::this_thread::sleep_for(500ms);
    auto r = Ferry("migrate --api-socket " + src.socket() + " --to tcp:10.78.0.2:" + std::to_string(port) + " --json --no-progress",
                   link.a());
    ASSERT_EQ(r.rc, 0) << r.out << src.Stderr() << dst.Stderr();
    std::this_thread::sleep_for(1s);
    const auto p = probe.Stop();
    std::printf("migration over 1 Gbit/s tbf: %s\nprobe: %s\n", r.json.dump().c_str(), p.dump().c_str());
    ASSERT_TRUE(r.json.is_object()) << r.out;
    EXPECT_EQ(r.json["status"], "completed");
    // The link is really capped: the first round alone moves 128 MiB of fresh pages.
    EXPECT_LT(r.json["mbps"].get<double>(), 1100.0) << r.out;
    // Converged: pre-copy to the end (no switch to post-copy, no throttling), stopped by the
    // policy's own decision within the downtime target, not forced at the iteration cap.
    const double target_ms = r.json["downtime_target_ms"].get<double>();
    EXPECT_EQ(r.json["mode"], "precopy") << r.out;
    EXPECT_EQ(r.json["postcopy_pages"].get<uint64_t>(), 0u) << r.out;
    EXPECT_EQ(r.json["converged"], true) << r.json["stop"].dump();
    EXPECT_EQ(r.json["throttle_max_pct"].get<double>(), 0.0) << r.out;
    const std::string reason = r.json["stop"].value("reason", "");
    EXPECT_FALSE(reason.empty()) << r.json["stop"].dump();
    EXPECT_EQ(reason.find("not converg"), std::string::npos) << reason;
    EXPECT_EQ(reason.find("policy force"), std::string::npos) << reason;
    EXPECT_LE(r.json["predicted_downtime_ms"].get<double>(), target_ms) << r.json["stop"].dump();
    // Downtime: the VMM's pause and the service's longest silence within the target (300 ms by
    // default), the silence counted against the destination's resume (answers after it).
    EXPECT_LE(r.json["downtime_ms"].get<double>(), target_ms) << r.out;
    const auto resumed = GuestResumedMono(dst.Stderr());
    ASSERT_TRUE(resumed) << dst.Stderr();
    ExpectServiceContinuesAfterResume(p, *resumed, r.json["downtime_ms"].get<double>(), target_ms);
    EXPECT_LE(p["max_gap_ms"].get<double>(), target_ms) << "service downtime over the target: " << p.dump();
    ASSERT_TRUE(MemverifyOk(dst, 128 * 256)) << dst.Console() << dst.Stderr();
    EXPECT_EQ(dst.Console().find("FAIL"), std::string::npos);
    EXPECT_EQ(dst.Api("PUT", "/vm/shutdown", "{}"), 200);
    EXPECT_EQ(dst.Wait(10s), 0);
  }
  RemoveTree(dir);
}

}  // namespace
}  // namespace ferry::test
