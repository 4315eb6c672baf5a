// Writing a snapshot file safely: no file planted under a predictable temporary name is written
// through, nothing is left behind, and the result reads back.
#include "vmm/snapshot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace ferry {
namespace {

class SnapshotFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ferry-snaptest-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto mem = GuestMemory::Create(0x80000000ull, 1 << 20);
    ASSERT_TRUE(mem) << mem.error().message();
    mem_ = std::move(*mem);
    std::memset(mem_->host() + 4096, 0x5a, 4096);
    st_.config = {{"mem_bytes", 1 << 20}};
    st_.vcpu = {1, 2, 3};
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  static std::string Read(const std::string& p) {
    std::ifstream f(p);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  std::string dir_;
  std::unique_ptr<GuestMemory> mem_;
  SnapshotState st_;
};

TEST_F(SnapshotFile, APlantedTemporaryNameIsNotWrittenThrough) {
  const std::string path = dir_ + "/vm.snap", victim = dir_ + "/victim";
  { std::ofstream(victim) << "precious"; }
  // The temporary names a writer could predict (the old one was path.tmp.PID): symlinks to a victim.
  ASSERT_EQ(symlink(victim.c_str(), (path + ".tmp." + std::to_string(getpid())).c_str()), 0);
  ASSERT_TRUE(WriteSnapshot(path, st_, *mem_));
  EXPECT_EQ(Read(victim), "precious");
  struct stat sb;
  ASSERT_EQ(lstat(path.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISREG(sb.st_mode));
  EXPECT_EQ(sb.st_mode & 0777, 0600u);
  // Reads back.
  auto back = ReadSnapshot(path, [&](const nlohmann::json&) -> Result<GuestMemory*> { return mem_.get(); });
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->vcpu, st_.vcpu);
  // Only the snapshot, the victim and the planted link remain: no temporary file left behind.
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) ++n, (void)e;
  EXPECT_EQ(n, 3u);
}

TEST_F(SnapshotFile, ASnapshotPathThatIsASymlinkIsReplacedNotFollowed) {
  const std::string path = dir_ + "/vm.snap", victim = dir_ + "/victim";
  { std::ofstream(victim) << "precious"; }
  ASSERT_EQ(symlink(victim.c_str(), path.c_str()), 0);
  ASSERT_TRUE(WriteSnapshot(path, st_, *mem_));
  EXPECT_EQ(Read(victim), "precious");
  struct stat sb;
  ASSERT_EQ(lstat(path.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISREG(sb.st_mode));
}

TEST_F(SnapshotFile, AFailedWriteLeavesNothingBehind) {
  auto s = WriteSnapshot(dir_ + "/missing-dir/vm.snap", st_, *mem_);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("missing-dir"), std::string::npos) << s.error().message();
  EXPECT_TRUE(std::filesystem::is_empty(dir_));
}

// The claim a restored VM holds on its snapshot: one holder at a time (named in the refusal), free
// again once the holder is gone, and a symlink planted under the claim's name is never written
// through (the claim file is truncated and rewritten with the holder's pid).
TEST_F(SnapshotFile, OneClaimAtATimeAndAPlantedClaimLinkIsNotWrittenThrough) {
  const std::string path = dir_ + "/vm.snap", victim = dir_ + "/victim";
  ASSERT_TRUE(WriteSnapshot(path, st_, *mem_));
  {
    auto first = SnapshotClaim::Acquire(path);
    ASSERT_TRUE(first) << first.error().message();
    auto second = SnapshotClaim::Acquire(path);  // another open file description: flock conflicts
    ASSERT_FALSE(second);
    EXPECT_EQ(second.error().code(), ErrorCode::kBusy);
    EXPECT_NE(second.error().message().find("pid " + std::to_string(getpid())), std::string::npos) << second.error().message();
  }
  auto again = SnapshotClaim::Acquire(path);
  ASSERT_TRUE(again) << again.error().message();
  const std::string claim = again->path();
  { auto gone = std::move(*again); }
  std::filesystem::remove(claim);
  { std::ofstream(victim) << "precious"; }
  ASSERT_EQ(symlink(victim.c_str(), claim.c_str()), 0);
  auto planted = SnapshotClaim::Acquire(path);
  EXPECT_FALSE(planted);
  EXPECT_EQ(Read(victim), "precious");
}

}  // namespace
}  // namespace ferry
