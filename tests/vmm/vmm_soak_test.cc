// Slow: memverify after 60 s of memdirty at 20k pages/s.
#include <sys/stat.h>

#include <gtest/gtest.h>

#include "vm_process.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;

TEST(VmmSoak, MemverifyAfter60sOfMemdirtyAt20kPagesPerSecond) {
  struct stat st;
  ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "run scripts/setup";
  std::string dir = MakeTempDir("soak");
  {
    VmProcess vm({"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline",
                  "console=ttyS0 ferry.run=memdirty:mib=64,rate=20000,bytes=4096,verify=0"},
                 dir);
    ASSERT_TRUE(vm.Start());
    ASSERT_TRUE(vm.WaitConsole("memdirty started", 20s)) << vm.Console();
    std::this_thread::sleep_for(60s);
    size_t at = vm.ConsoleSize();
    vm.SendConsole("memverify");
    ASSERT_TRUE(vm.WaitConsole("memverify ok pages=16384", 60s, at)) << vm.Console();
    std::string c = vm.Console();
    EXPECT_EQ(c.find("FAIL"), std::string::npos);
    // Report the achieved dirty rate (printed by the guest every 5 s).
    size_t p = c.rfind("memdirty rate=");
    if (p != std::string::npos) std::printf("%s\n", c.substr(p, c.find('\n', p) - p).c_str());
  }
  RemoveTree(dir);
}

}  // namespace
}  // namespace ferry::test
