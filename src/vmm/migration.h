// ferry-vmm's side of live migration: adapters from Vm to the VMM-neutral engine
// (src/migration/engine/vm_interface.h) and the source's migration manager behind
// PUT /vm/migrate, GET /vm/migration, PUT /vm/migration/cancel (a destination's API before the VM
// exists is served from the engine's IncomingMigration directly: api_server.h).
#pragma once

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/thread_annotations.h"
#include "migration/engine/destination.h"
#include "migration/engine/source.h"
#include "vmm/vm.h"

namespace ferry {

// The engine's view of a VM's dirty log (the CPU's code watch and the marks' encoding stay here).
class DirtyLogTracker final : public migration::DirtyTracker {
 public:
  explicit DirtyLogTracker(DirtyLog* log) : log_(log) {}
  void Harvest(migration::PageBitmap* dirty, migration::PageBitmap* freed) override { log_->Harvest(dirty, freed); }
  uint64_t CountDirty() const override { return log_->CountDirty(); }
  bool WrittenSinceHarvest(uint64_t page) const override { return log_->IsDirty(page); }
  void BeginTracking() override { log_->BeginTracking(); }
  void EndTracking() override { log_->EndTracking(); }

 private:
  DirtyLog* log_;
};

// Source: one migration at a time; the last one's stats stay readable.
class VmMigrationManager : public migration::SourceVm {
 public:
  explicit VmMigrationManager(Vm* vm) : vm_(vm), tracker_(&vm->memory().dirty_log()) {}
  ~VmMigrationManager() override;

  Status Start(const nlohmann::json& body) EXCLUDES(mu_);
  Result<nlohmann::json> Stats() EXCLUDES(mu_);
  Status Cancel() EXCLUDES(mu_);
  // PUT /vm/migration/postcopy: the running pre-copy switches to post-copy.
  Status StartPostcopy() EXCLUDES(mu_);
  // PUT /vm/migration/recover: a post-copy whose connection was cut reconnects to `to`.
  Status Recover(const std::string& to) EXCLUDES(mu_);
  // True while a migration is between setup and its final status (the API refuses
  // pause/resume/snapshot then).
  bool active() EXCLUDES(mu_);

  // migration::SourceVm
  migration::RamView Ram() override;
  Result<nlohmann::json> Config() override;
  Status Pause() override;
  Status Resume() override;
  Result<std::vector<migration::StateRecord>> SaveState() override;
  uint64_t EstimateStateBytes() override;
  Status SetCpuShare(double fraction) override;
  migration::ActivitySeries RecentActivity(size_t max_windows) override;
  void OnMigrated(const std::string& destination) override;

 private:
  Vm* vm_;
  DirtyLogTracker tracker_;
  Mutex mu_;
  std::unique_ptr<migration::SourceMigration> current_ GUARDED_BY(mu_);
  bool paused_by_migration_ = false;                      // migration thread only
};

// Destination: builds the Vm when the configuration arrives.
class VmMigrationTarget : public migration::DestinationVm {
 public:
  // max_ram_bytes: the most guest RAM a CONFIG may ask for (0: no limit beyond the board's).
  // start_paused (--incoming-paused): Start() announces the MAC but leaves the guest paused.
  explicit VmMigrationTarget(VmOptions options, uint64_t max_ram_bytes = 0, bool start_paused = false)
      : options_(std::move(options)), max_ram_(max_ram_bytes), start_paused_(start_paused) {}
  Result<migration::RamView> Prepare(const nlohmann::json& config) override;
  Status Restore(const std::vector<migration::StateRecord>& state) override;
  Status Start() override;
  std::unique_ptr<Vm> TakeVm() { return std::move(vm_); }
  // The prepared (or started) VM, null before the configuration arrived; the thread that ran
  // IncomingMigration::Run may use it once Run returned.
  Vm* vm() const { return vm_.get(); }

 private:
  VmOptions options_;
  uint64_t max_ram_ = 0;
  bool start_paused_ = false;
  std::unique_ptr<Vm> vm_;
};

}  // namespace ferry
