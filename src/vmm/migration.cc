#include "vmm/migration.h"

#include <spdlog/spdlog.h>

namespace ferry {

VmMigrationManager::~VmMigrationManager() {
  std::unique_ptr<migration::SourceMigration> m;
  {
    MutexLock l(mu_);
    m = std::move(current_);
  }
  m.reset();  // cancels if still running, joins
}

Status VmMigrationManager::Start(const nlohmann::json& body) {
  auto params = migration::ParseSourceParams(body);
  if (!params) return std::unexpected(params.error());
  MutexLock l(mu_);
  if (current_ && !migration::IsFinal(current_->status()))
    return Errorf(ErrorCode::kBusy, "a migration is already in progress (status {})", migration::MigrationStatusName(current_->status()));
  const VmState st = vm_->state();
  if (st != VmState::kRunning && st != VmState::kPaused)
    return Errorf(ErrorCode::kBusy, "cannot migrate a VM in state {}", VmStateName(st));
  if (current_) current_.reset();  // joins the finished one
  current_ = migration::SourceMigration::Start(this, std::move(*params));
  return {};
}

Result<nlohmann::json> VmMigrationManager::Stats() {
  MutexLock l(mu_);
  if (!current_) return Errorf(ErrorCode::kNotFound, "no migration has been started");
  return current_->Stats();
}

Status VmMigrationManager::Cancel() {
  MutexLock l(mu_);
  if (!current_) return Errorf(ErrorCode::kNotFound, "no migration has been started");
  return current_->Cancel();
}

Status VmMigrationManager::StartPostcopy() {
  MutexLock l(mu_);
  if (!current_) return Errorf(ErrorCode::kNotFound, "no migration has been started");
  return current_->StartPostcopy();
}

Status VmMigrationManager::Recover(const std::string& to) {
  MutexLock l(mu_);
  if (!current_) return Errorf(ErrorCode::kNotFound, "no migration has been started");
  return current_->Recover(to);
}

bool VmMigrationManager::active() {
  MutexLock l(mu_);
  return current_ && !migration::IsFinal(current_->status());
}

migration::RamView VmMigrationManager::Ram() {
  GuestMemory& m = vm_->memory();
  return {m.host(), m.size(), &tracker_, m.memfd(), {}};
}

Result<nlohmann::json> VmMigrationManager::Config() {
  auto info = vm_->Info();
  if (!info) return std::unexpected(info.error());
  nlohmann::json board = (*info)["config"];
  board.erase("tap");  // host-side detail
  // The same VM moves: the destination keeps its identity.
  return nlohmann::json{{"board", board}, {"vmm", "ferry-vmm"}, {"generation_id", (*info).value("generation_id", "")}};
}

Status VmMigrationManager::Pause() {
  if (vm_->state() == VmState::kPaused) return {};  // the operator paused it: leave it so afterwards
  FERRY_RETURN_IF_ERROR(vm_->Pause(), "pause");
  paused_by_migration_ = true;
  return {};
}

Status VmMigrationManager::Resume() {
  if (!paused_by_migration_) return {};
  paused_by_migration_ = false;
  return vm_->Resume();
}

Result<std::vector<migration::StateRecord>> VmMigrationManager::SaveState() { return vm_->SaveStateRecords(); }

uint64_t VmMigrationManager::EstimateStateBytes() {
  auto n = vm_->StateBytes();
  return n ? *n : 0;
}

Status VmMigrationManager::SetCpuShare(double fraction) { return vm_->SetCpuShare(fraction); }

migration::ActivitySeries VmMigrationManager::RecentActivity(size_t max_windows) { return vm_->RecentActivity(max_windows); }

void VmMigrationManager::OnMigrated(const std::string& destination) {
  auto s = vm_->MarkMigrated(destination);
  if (!s) spdlog::error("migration: cannot mark the VM migrated: {}", s.error().message());
}

Result<migration::RamView> VmMigrationTarget::Prepare(const nlohmann::json& config) {
  if (vm_) return Errorf(ErrorCode::kBusy, "configuration received twice");
  if (!config.contains("board") || !config["board"].is_object())
    return Errorf(ErrorCode::kCorrupt, "configuration has no \"board\" object");
  VmOptions opts = options_;
  FERRY_RETURN_IF_ERROR(opts.board.ApplyGuestJson(config["board"]), "guest configuration");
  if (auto id = config.find("generation_id"); id != config.end()) {
    if (!id->is_string() || id->get_ref<const std::string&>().size() > 64)
      return Errorf(ErrorCode::kCorrupt, "configuration: \"generation_id\" must be a string of at most 64 characters");
    opts.generation_id = id->get<std::string>();
  }
  if (max_ram_ && opts.board.ram_bytes > max_ram_)
    return Errorf(ErrorCode::kInvalidArgument, "the VM has {} MiB of RAM; this destination takes at most {} MiB (--max-mem)",
                  opts.board.ram_bytes >> 20, max_ram_ >> 20);
  auto vm = Vm::CreateIncoming(opts);
  if (!vm) return std::unexpected(vm.error());
  vm_ = std::move(*vm);
  GuestMemory& m = vm_->memory();
  spdlog::info("incoming: machine prepared: {} MiB RAM, cmdline '{}'", m.size() >> 20, opts.board.cmdline);
  // Free pages: release their memory here too, and remember them as free (a later migration of
  // this VM then skips them as well).
  auto discard = [&m](uint64_t first, uint64_t count) { return m.Discard(m.base() + first * kPageSize, count * kPageSize); };
  return migration::RamView{m.host(), m.size(), nullptr, m.memfd(), discard};
}

Status VmMigrationTarget::Restore(const std::vector<migration::StateRecord>& state) {
  if (!vm_) return Errorf(ErrorCode::kBusy, "state before configuration");
  return vm_->RestoreStateRecords(state);
}

Status VmMigrationTarget::Start() {
  if (!vm_) return Errorf(ErrorCode::kBusy, "start before configuration");
  // Tell the bridge where the guest's MAC lives now (the guest keeps MAC and IP), before the
  // guest runs: the clients' next frames then come here while the machine thread starts
  // (announcing after the start waited for the machine thread's first slice).
  auto s = vm_->AnnounceNetwork();
  if (!s) spdlog::warn("incoming: MAC announcement failed: {}", s.error().message());
  FERRY_RETURN_IF_ERROR(vm_->Start(start_paused_), "start");
  return {};
}

}  // namespace ferry
