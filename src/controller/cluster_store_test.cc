// Typed records over the SQLite store: what depends on what is written together or not at all,
// and a record that does not decode is an error naming its key.
#include "controller/cluster_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

namespace ferry::controller {
namespace {

class ClusterStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("ferry-cs-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir_);
    store_ = Open();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  std::unique_ptr<ClusterStore> Open() {
    auto kv = OpenKvStore("sqlite:" + (dir_ / "c.db").string());
    EXPECT_TRUE(kv);
    return std::make_unique<ClusterStore>(std::move(*kv));
  }
  std::filesystem::path dir_;
  std::unique_ptr<ClusterStore> store_;
};

TEST_F(ClusterStoreTest, AVmNeedsItsHostAndAFreeName) {
  ASSERT_TRUE(store_->AddHost({"a", "http://127.0.0.1:7101", HostState::kActive, 1}));
  auto dup = store_->AddHost({"a", "http://127.0.0.1:7102", HostState::kActive, 2});
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code(), ErrorCode::kBusy);
  EXPECT_EQ(dup.error().message(), "host a exists");
  VmRecord vm{"web", "a", {{"mem", "64M"}}, 64 << 20, "running", "", 3};
  ASSERT_TRUE(store_->AddVm(vm));
  auto again = store_->AddVm(vm);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().message(), "VM web exists");
  VmRecord orphan = vm;
  orphan.name = "orphan";
  orphan.host = "nohost";
  auto no_host = store_->AddVm(orphan);
  ASSERT_FALSE(no_host);
  EXPECT_EQ(no_host.error().code(), ErrorCode::kNotFound);
  EXPECT_FALSE(store_->Vm("orphan")->has_value());
  auto missing = store_->PutHost({"b", "x", HostState::kDraining, 0});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code(), ErrorCode::kNotFound);
}

TEST_F(ClusterStoreTest, AMigrationAndItsVmChangeTogetherAndSurviveARestart) {
  ASSERT_TRUE(store_->AddHost({"a", "u", HostState::kActive, 1}));
  ASSERT_TRUE(store_->AddHost({"b", "u", HostState::kActive, 1}));
  VmRecord vm{"web", "a", nlohmann::json::object(), 64 << 20, "running", "", 3};
  ASSERT_TRUE(store_->AddVm(vm));
  MigrationRecord m{"0000000000100-web", "web", "a", "b", "cpu 90% > 75% for 12 s on a", "running", "", 100};
  vm.state = "migrating";
  ASSERT_TRUE(store_->StartMigration(m, vm));
  m.status = "completed";
  m.total_ms = 812.5;
  m.downtime_ms = 21.25;
  vm.state = "running";
  vm.host = "b";
  ASSERT_TRUE(store_->EndMigration(m, vm));
  ASSERT_TRUE(store_->PutHost({"a", "u", HostState::kDraining, 1}));
  store_ = Open();  // a restarted controller reads the same
  auto ms = store_->Migrations();
  ASSERT_TRUE(ms);
  ASSERT_EQ(ms->size(), 1u);
  EXPECT_EQ((*ms)[0].status, "completed");
  EXPECT_EQ((*ms)[0].reason, "cpu 90% > 75% for 12 s on a");
  EXPECT_EQ((*ms)[0].downtime_ms, 21.25);
  EXPECT_EQ((*store_->Vm("web"))->host, "b");
  EXPECT_EQ((*store_->Host("a"))->state, HostState::kDraining);
  // The start of a migration whose VM was deleted meanwhile writes nothing.
  ASSERT_TRUE(store_->DeleteVm("web"));
  MigrationRecord late{"0000000000200-web", "web", "b", "a", "drain of b", "running", "", 200};
  EXPECT_FALSE(store_->StartMigration(late, vm));
  EXPECT_EQ(store_->Migrations()->size(), 1u);
}

TEST_F(ClusterStoreTest, ARecordThatDoesNotDecodeIsAnErrorNamingItsKey) {
  ASSERT_TRUE(store_->kv().Apply({{KvOp::kPut, "vms/broken", "{\"name\": 5}"}}));
  auto vms = store_->Vms();
  ASSERT_FALSE(vms);
  EXPECT_EQ(vms.error().code(), ErrorCode::kCorrupt);
  EXPECT_NE(vms.error().message().find("store record vms/broken"), std::string::npos) << vms.error().message();
}

TEST_F(ClusterStoreTest, EventsKeepTheirOrderAndOnlyTheNewestStay) {
  for (int i = 0; i < 2100; ++i) ASSERT_TRUE(store_->AddEvent("test", "event " + std::to_string(i), 1000 + static_cast<uint64_t>(i)));
  auto ev = store_->Events();
  ASSERT_TRUE(ev);
  ASSERT_EQ(ev->size(), 2000u);
  EXPECT_EQ(ev->front().text, "event 100");
  EXPECT_EQ(ev->back().text, "event 2099");
}

}  // namespace
}  // namespace ferry::controller
