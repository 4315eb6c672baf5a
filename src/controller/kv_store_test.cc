// Both stores, SQLite and a real etcd, through the same tests: ordered prefixes, all-or-nothing
// conditional writes, durability across a reopen, and the leader lease between two clients (as
// two controller processes).
#include "controller/kv_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "common/clock.h"
#include "controller/testing/etcd_process.h"

namespace ferry::controller {
namespace {

class KvStoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("ferry-kv-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir_);
    if (GetParam() == "etcd") {
      ASSERT_TRUE(etcd_.Start()) << etcd_.why();
      spec_ = "etcd:" + etcd_.url();
    } else {
      spec_ = "sqlite:" + (dir_ / "controller.db").string();
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::unique_ptr<KvStore> Open() {
    auto kv = OpenKvStore(spec_);
    EXPECT_TRUE(kv) << kv.error().message();
    return kv ? std::move(*kv) : nullptr;
  }
  std::filesystem::path dir_;
  std::string spec_;
  testing::EtcdProcess etcd_;
};

TEST_P(KvStoreTest, ListsAPrefixInKeyOrderAndSurvivesAReopen) {
  {
    auto kv = Open();
    ASSERT_TRUE(kv);
    ASSERT_TRUE(kv->Apply({{KvOp::kPut, "vms/b", "2"}, {KvOp::kPut, "vms/a", "1"}, {KvOp::kPut, "vmsx", "no"},
                           {KvOp::kPut, "hosts/a", "h"}}));
    ASSERT_TRUE(kv->Apply({{KvOp::kPut, "vms/b", "two"}}));  // replaces
  }
  auto kv = Open();
  ASSERT_TRUE(kv);
  auto l = kv->List("vms/");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_EQ(l->size(), 2u);
  EXPECT_EQ((*l)[0], std::make_pair(std::string("vms/a"), std::string("1")));
  EXPECT_EQ((*l)[1], std::make_pair(std::string("vms/b"), std::string("two")));
  EXPECT_EQ(kv->List("")->size(), 4u);
  EXPECT_EQ(**kv->Get("hosts/a"), "h");
  EXPECT_FALSE(kv->Get("hosts/zz")->has_value());
  ASSERT_TRUE(kv->Apply({{KvOp::kDelete, "vms/a", ""}}));
  EXPECT_EQ(kv->List("vms/")->size(), 1u);
  // Binary values come back as they went in.
  const std::string bin("a\0b\xff", 4);
  ASSERT_TRUE(kv->Apply({{KvOp::kPut, "bin", bin}}));
  EXPECT_EQ(**kv->Get("bin"), bin);
}

TEST_P(KvStoreTest, AFailedConditionWritesNothing) {
  auto kv = Open();
  ASSERT_TRUE(kv);
  ASSERT_TRUE(kv->Apply({{KvOp::kPut, "vms/web", "1"}}, {{KvCondition::kAbsent, "vms/web"}}));
  auto again = kv->Apply({{KvOp::kPut, "hosts/x", "1"}, {KvOp::kPut, "vms/web", "2"}}, {{KvCondition::kAbsent, "vms/web"}});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code(), ErrorCode::kBusy);
  EXPECT_EQ(again.error().message(), "vms/web exists");
  EXPECT_EQ(**kv->Get("vms/web"), "1");
  EXPECT_FALSE(kv->Get("hosts/x")->has_value());
  auto missing = kv->Apply({{KvOp::kPut, "vms/web", "3"}}, {{KvCondition::kExists, "hosts/h1"}});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().message(), "hosts/h1 does not exist");
  EXPECT_EQ(**kv->Get("vms/web"), "1");
}

TEST_P(KvStoreTest, OneLeaderAtATimeUntilItsLeaseRunsOutOrItResigns) {
  auto a = Open(), b = Open();
  ASSERT_TRUE(a && b);
  const uint64_t ttl = 1000;
  EXPECT_TRUE(*a->TryLead("ctl-a", ttl));
  EXPECT_FALSE(*b->TryLead("ctl-b", ttl));
  EXPECT_TRUE(*a->TryLead("ctl-a", ttl));  // renewed
  // a stops renewing: b takes over once the lease ran out (etcd may round a TTL up), not before.
  const uint64_t t0 = NowNs();
  bool took = false;
  while (!took && NowNs() - t0 < 15'000'000'000) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    took = *b->TryLead("ctl-b", ttl);
  }
  ASSERT_TRUE(took);
  EXPECT_GE(NowNs() - t0, ttl * 1'000'000 - 200'000'000);
  EXPECT_FALSE(*a->TryLead("ctl-a", ttl));
  ASSERT_TRUE(b->Resign("ctl-b"));
  EXPECT_TRUE(*a->TryLead("ctl-a", ttl));  // at once: a resignation frees the lease
  ASSERT_TRUE(b->Resign("ctl-b"));  // not the holder: nothing changes
  EXPECT_FALSE(*b->TryLead("ctl-b", ttl));
}

INSTANTIATE_TEST_SUITE_P(Stores, KvStoreTest, ::testing::Values("sqlite", "etcd"));

TEST(KvStoreSpec, BadSpecsAreRefusedWithTheReason) {
  auto bad = OpenKvStore("mysql:x");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  auto nodir = OpenKvStore("sqlite:/nonexistent-dir/x.db");
  ASSERT_FALSE(nodir);
  EXPECT_NE(nodir.error().message().find("/nonexistent-dir/x.db"), std::string::npos) << nodir.error().message();
  auto noetcd = OpenKvStore("etcd:http://127.0.0.1:1");
  ASSERT_FALSE(noetcd);
  EXPECT_NE(noetcd.error().message().find("no endpoint answered"), std::string::npos) << noetcd.error().message();
  EXPECT_FALSE(OpenKvStore("etcd:https://127.0.0.1:2379"));
  EXPECT_FALSE(OpenKvStore("etcd:"));
}

}  // namespace
}  // namespace ferry::controller
