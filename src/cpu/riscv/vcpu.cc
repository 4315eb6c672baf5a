// RiscvCpu lifecycle: construction, the Run() loop, interrupt lines, timers,
// save/restore of the complete architectural state, and the backend factory.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "common/state_io.h"
#include "cpu/riscv/mem_inline.h"

namespace ferry {

std::unique_ptr<Vcpu> CreateRiscvVcpu(int hart_id, const VcpuEnv& env) {
  return std::make_unique<riscv::RiscvCpu>(hart_id, env);
}

namespace riscv {

namespace {
constexpr uint64_t kMisa = (2ull << 62) | (1u << 0) | (1u << 2) | (1u << 3) | (1u << 5) | (1u << 8) | (1u << 12) |
                           (1u << 18) | (1u << 20);  // RV64 IMAFDC + S + U
constexpr uint32_t kStateVersion = 1;
constexpr uint64_t kChunk = 8192;
constexpr uint64_t kHardwareLines = (1ull << 3) | (1ull << 9) | (1ull << 11);  // MSIP, SEIP, MEIP
}  // namespace

RiscvCpu::RiscvCpu(int hart_id, const VcpuEnv& env) : hart_id_(hart_id), env_(env) {
  ram_host_ = env.memory ? env.memory->host() : nullptr;
  ram_base_ = env.memory ? env.memory->base() : 0;
  ram_size_ = env.memory ? env.memory->size() : 0;
  dirty_marks_ = env.memory ? env.memory->dirty_log().raw_marks() : nullptr;
  newly_dirtied_ = env.memory ? env.memory->dirty_log().raw_newly_dirtied() : nullptr;
  misa_ = kMisa;
  if (env.memory) {
    env.memory->dirty_log().AddListener(this);
    dirty_log_ = &env.memory->dirty_log();
    code_watch_ = dirty_log_->raw_code_watch();
    code_gen_seen_ = dirty_log_->code_write_generation();
    page_of_ppn_.assign(ram_size_ >> 12, nullptr);
  }
  RunDecoded(0);  // publishes the handler table
  // Debug aid: FERRY_CPU_TRACE=PATH writes "priv pc" per executed instruction, for
  // diffing against `qemu-system-riscv64 -d exec,nochain -singlestep`.
  if (const char* t = getenv("FERRY_CPU_TRACE"); t && *t) trace_ = fopen(t, "w");
}

RiscvCpu::~RiscvCpu() {
  if (trace_) fclose(trace_);
  if (env_.memory) env_.memory->dirty_log().RemoveListener(this);
}

void RiscvCpu::SetBootState(uint64_t pc, uint64_t a0, uint64_t a1, int privilege) {
  pc_ = pc;
  x_[10] = a0;
  x_[11] = a1;
  priv_ = privilege;
  if (privilege == kSupervisor) {
    // What firmware leaves behind for an S-mode kernel: every delegable trap goes to S,
    // counters are readable.
    medeleg_ = 0xb3ff;
    mideleg_ = (1ull << 1) | (1ull << 5) | (1ull << 9);
    mcounteren_ = 7;
    // Linux 6.1 without a PMU driver never writes scounteren; the vDSO reads `time` from
    // U-mode, so (like firmware on real boards) leave cycle/time/instret readable.
    scounteren_ = 7;
  }
  FlushTlb();
  FlushDecodeCache();
}

void RiscvCpu::RequestExit() {
  exit_requested_.store(true, std::memory_order_release);
  attention_.store(true, std::memory_order_release);
}

void RiscvCpu::SetInterruptLine(InterruptLine line, bool level) {
  uint64_t bit = 1ull << static_cast<unsigned>(line);
  if (level) lines_.fetch_or(bit, std::memory_order_relaxed);
  else lines_.fetch_and(~bit, std::memory_order_relaxed);
  attention_.store(true, std::memory_order_release);
}

void RiscvCpu::SetTimerDeadline(InterruptLine line, uint64_t ticks) {
  if (line == InterruptLine::kMachineTimer) mtimer_deadline_.store(ticks, std::memory_order_relaxed);
  else if (line == InterruptLine::kSupervisorTimer) stimer_deadline_.store(ticks, std::memory_order_relaxed);
  if (env_.time) UpdateTimerLines(env_.time->Ticks());
  attention_.store(true, std::memory_order_release);
}

uint64_t RiscvCpu::NextTimerDeadline() const {
  uint64_t lines = lines_.load(std::memory_order_relaxed);
  uint64_t best = UINT64_MAX;
  if ((mie_ & (1ull << 7)) && !(lines & (1ull << 7))) best = std::min(best, mtimer_deadline_.load());
  if ((mie_ & (1ull << 5)) && !(lines & (1ull << 5))) best = std::min(best, stimer_deadline_.load());
  return best;
}

VcpuRunResult RiscvCpu::Run(uint64_t max_instructions) {
  {
    std::lock_guard<std::mutex> lock(harvest_mu_);
    in_run_ = true;
    run_thread_ = std::this_thread::get_id();
  }
  VcpuRunResult res{VcpuExitReason::kBudgetExhausted, 0, {}};
  uint64_t executed = 0;
  for (;;) {
    if (harvest_pending_.load(std::memory_order_acquire)) ServiceHarvestRequest();
    if (exit_requested_.exchange(false, std::memory_order_acq_rel)) { res.reason = VcpuExitReason::kExitRequested; break; }
    if (sbi_action_) {
      res.reason = sbi_action_ == static_cast<int>(SbiAction::kShutdown) ? VcpuExitReason::kShutdown : VcpuExitReason::kReset;
      sbi_action_ = 0;
      break;
    }
    if (env_.time) UpdateTimerLines(env_.time->Ticks());
    if (wfi_) {
      if (Mip() & mie_) {
        wfi_ = false;
      } else {
        res.reason = VcpuExitReason::kWaitForInterrupt;
        counters_.wfi_exits++;
        break;
      }
    }
    CheckInterrupts();
    if (executed >= max_instructions) break;
    const uint64_t n = std::min(kChunk, max_instructions - executed);
    attention_.store(false, std::memory_order_relaxed);
    CheckDeviceCodeWrites();  // devices ran on this thread between slices
    uint64_t i = 0;
    if (__builtin_expect(trace_ == nullptr, 1)) {
      // Decoded fast path; returns early (at block granularity) once attention_ is raised.
      i = RunDecoded(n);
    } else {
      while (i < n) {  // one instruction at a time, decoding each (the reference path)
        fprintf(trace_, "%d %016llx\n", priv_, static_cast<unsigned long long>(pc_));
        instret_ += i;  // a CSR read of cycle/instret sees the instructions retired so far
        Step();
        instret_ -= i;
        ++i;
        // WFI, host traps, CSR writes that change interrupt state and other threads all raise attention_.
        if (__builtin_expect(attention_.load(std::memory_order_relaxed), 0)) break;
      }
    }
    executed += i;
    instret_ += i;
    if (host_trap_taken_) {
      host_trap_taken_ = false;
      res.reason = VcpuExitReason::kHostTrap;
      break;
    }
  }
  res.instructions = executed;
  counters_.instructions_retired += executed;
  {
    std::lock_guard<std::mutex> lock(harvest_mu_);
    in_run_ = false;
    if (harvest_pending_.load(std::memory_order_relaxed)) {
      FlushWriteTlb();
      harvest_done_ = harvest_requested_;
      harvest_pending_.store(false, std::memory_order_relaxed);
    }
  }
  harvest_cv_.notify_all();
  return res;
}

VcpuCounters RiscvCpu::counters() const { return counters_; }

std::vector<uint8_t> RiscvCpu::SaveState() const {
  StateWriter w;
  w.PutU32(kStateVersion);
  for (int i = 0; i < 32; ++i) w.PutU64(x_[i]);
  for (uint64_t v : f_) w.PutU64(v);
  w.PutU64(pc_);
  w.PutU8(static_cast<uint8_t>(priv_));
  w.PutU32(fflags_);
  w.PutU32(frm_);
  for (uint64_t v : {mstatus_, misa_, medeleg_, mideleg_, mie_, mip_, mtvec_, mscratch_, mepc_, mcause_, mtval_,
                     mcounteren_, stvec_, sscratch_, sepc_, scause_, stval_, satp_, scounteren_, menvcfg_, senvcfg_,
                     mcountinhibit_, instret_})
    w.PutU64(v);
  for (uint64_t v : pmpcfg_) w.PutU64(v);
  for (uint64_t v : pmpaddr_) w.PutU64(v);
  w.PutBool(wfi_);
  w.PutU64(mtimer_deadline_.load());
  w.PutU64(stimer_deadline_.load());
  w.PutU64(lines_.load() & kHardwareLines);
  return w.Take();
}

Status RiscvCpu::RestoreState(std::span<const uint8_t> blob) {
  StateReader r(blob);
  FERRY_RETURN_IF_ERROR(r.ExpectVersion("riscv vcpu", kStateVersion), "restore vcpu");
  // Decode everything into a scratch copy first: a failure leaves the hart untouched.
  uint64_t x[32], f[32], csr[23], pmpcfg[16], pmpaddr[64];
  for (auto& v : x) FERRY_ASSIGN(v, r.GetU64());
  for (auto& v : f) FERRY_ASSIGN(v, r.GetU64());
  uint64_t pc;
  uint8_t priv;
  uint32_t fflags, frm;
  FERRY_ASSIGN(pc, r.GetU64());
  FERRY_ASSIGN(priv, r.GetU8());
  FERRY_ASSIGN(fflags, r.GetU32());
  FERRY_ASSIGN(frm, r.GetU32());
  for (auto& v : csr) FERRY_ASSIGN(v, r.GetU64());
  for (auto& v : pmpcfg) FERRY_ASSIGN(v, r.GetU64());
  for (auto& v : pmpaddr) FERRY_ASSIGN(v, r.GetU64());
  bool wfi;
  uint64_t mdl, sdl, lines;
  FERRY_ASSIGN(wfi, r.GetBool());
  FERRY_ASSIGN(mdl, r.GetU64());
  FERRY_ASSIGN(sdl, r.GetU64());
  FERRY_ASSIGN(lines, r.GetU64());
  FERRY_RETURN_IF_ERROR(r.ExpectEnd("riscv vcpu"), "restore vcpu");
  if (priv != kUser && priv != kSupervisor && priv != kMachine)
    return Errorf(ErrorCode::kCorrupt, "restore vcpu: invalid privilege level {}", priv);
  if (x[0] != 0) return Errorf(ErrorCode::kCorrupt, "restore vcpu: x0 is not zero");
  uint64_t satp_mode = csr[17] >> 60;
  if (satp_mode != 0 && satp_mode != 8 && satp_mode != 9)
    return Errorf(ErrorCode::kCorrupt, "restore vcpu: unsupported satp mode {}", satp_mode);
  if (fflags > 0x1f || frm > 7) return Errorf(ErrorCode::kCorrupt, "restore vcpu: bad fcsr");
  // mstatus as the hart could hold it: no bit it does not keep, MPP not the reserved 2.
  if ((csr[0] & ~kMstatusWritable) || ((csr[0] & kMstatusMPP) >> 11) == 2)
    return Errorf(ErrorCode::kCorrupt, "restore vcpu: mstatus {:#x} is not a value this hart can hold", csr[0]);
  if (csr[1] != kMisa) return Errorf(ErrorCode::kVersionMismatch, "restore vcpu: misa {:#x} differs from this CPU ({:#x})", csr[1], kMisa);

  std::copy(std::begin(x), std::end(x), x_);
  std::copy(std::begin(f), std::end(f), f_);
  pc_ = pc;
  priv_ = priv;
  fflags_ = fflags;
  frm_ = frm;
  uint64_t* dst[] = {&mstatus_, &misa_, &medeleg_, &mideleg_, &mie_, &mip_, &mtvec_, &mscratch_, &mepc_, &mcause_,
                     &mtval_, &mcounteren_, &stvec_, &sscratch_, &sepc_, &scause_, &stval_, &satp_, &scounteren_,
                     &menvcfg_, &senvcfg_, &mcountinhibit_, &instret_};
  for (size_t i = 0; i < std::size(dst); ++i) *dst[i] = csr[i];
  std::copy(std::begin(pmpcfg), std::end(pmpcfg), pmpcfg_);
  std::copy(std::begin(pmpaddr), std::end(pmpaddr), pmpaddr_);
  wfi_ = wfi;
  mtimer_deadline_.store(mdl);
  stimer_deadline_.store(sdl);
  lines_.store(lines & kHardwareLines);
  reservation_ = ~0ull;
  FlushTlb();
  FlushDecodeCache();  // RAM may have been replaced under us
  attention_.store(true);
  return {};
}

}  // namespace riscv
}  // namespace ferry
