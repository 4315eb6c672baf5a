// Software RV64IMAFDC (+Zicsr, Zifencei) hart with M/S/U modes, Sv39/Sv48 and a
// software TLB. Implements the Vcpu backend interface; this concrete header is for
// the backend's own tests and the differential user-mode harness only.
//
// Threading: Run() and all register accessors on the machine thread. RequestExit(),
// SetInterruptLine(), SetTimerDeadline() and OnDirtyLogHarvest() are thread-safe.
// OnDirtyLogHarvest() from another thread waits until a running Run() dropped its write
// TLB; from the thread executing Run() (a device handler calling DirtyLog::MarkFreed
// during an MMIO access) it drops it at once and never waits.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cpu/vcpu.h"

namespace ferry::riscv {

// Exception causes
enum : uint64_t {
  kCauseMisalignedFetch = 0, kCauseFetchAccess = 1, kCauseIllegal = 2, kCauseBreakpoint = 3,
  kCauseMisalignedLoad = 4, kCauseLoadAccess = 5, kCauseMisalignedStore = 6, kCauseStoreAccess = 7,
  kCauseEcallU = 8, kCauseEcallS = 9, kCauseEcallM = 11, kCauseFetchPage = 12, kCauseLoadPage = 13,
  kCauseStorePage = 15,
};
inline constexpr uint64_t kInterruptBit = 1ull << 63;

enum Priv : int { kUser = 0, kSupervisor = 1, kMachine = 3 };

// mstatus bits
inline constexpr uint64_t kMstatusSIE = 1ull << 1, kMstatusMIE = 1ull << 3, kMstatusSPIE = 1ull << 5,
                          kMstatusMPIE = 1ull << 7, kMstatusSPP = 1ull << 8, kMstatusMPP = 3ull << 11,
                          kMstatusFS = 3ull << 13, kMstatusMPRV = 1ull << 17, kMstatusSUM = 1ull << 18,
                          kMstatusMXR = 1ull << 19, kMstatusTVM = 1ull << 20, kMstatusTW = 1ull << 21,
                          kMstatusTSR = 1ull << 22, kMstatusSD = 1ull << 63;
// The bits mstatus holds (SD, UXL and SXL are computed on read); MPP is WARL: 2 is never held.
inline constexpr uint64_t kMstatusWritable = kMstatusSIE | kMstatusMIE | kMstatusSPIE | kMstatusMPIE | kMstatusSPP |
                                             kMstatusMPP | kMstatusFS | kMstatusMPRV | kMstatusSUM | kMstatusMXR |
                                             kMstatusTVM | kMstatusTW | kMstatusTSR;

class RiscvCpu final : public Vcpu {
 public:
  RiscvCpu(int hart_id, const VcpuEnv& env);
  ~RiscvCpu() override;

  // Vcpu
  int hart_id() const override { return hart_id_; }
  void SetBootState(uint64_t pc, uint64_t a0, uint64_t a1, int privilege) override;
  VcpuRunResult Run(uint64_t max_instructions) override;
  void RequestExit() override;
  void SetInterruptLine(InterruptLine line, bool level) override;
  void SetTimerDeadline(InterruptLine line, uint64_t ticks) override;
  uint64_t NextTimerDeadline() const override;
  std::vector<uint8_t> SaveState() const override;
  Status RestoreState(std::span<const uint8_t> blob) override;
  VcpuCounters counters() const override;
  void OnDirtyLogHarvest() override;

  // Harness access
  uint64_t x(int i) const { return x_[i]; }
  void set_x(int i, uint64_t v) { if (i) x_[i] = v; }
  uint64_t f(int i) const { return f_[i]; }
  void set_f(int i, uint64_t v) { f_[i] = v; }
  uint64_t pc() const { return pc_; }
  void set_pc(uint64_t v) { pc_ = v; }
  int priv() const { return priv_; }
  uint64_t ReadCsrForTest(uint32_t csr) const;
  void WriteCsrForTest(uint32_t csr, uint64_t v);
  void set_host_trap_mode(bool on) { host_trap_mode_ = on; }
  uint64_t last_trap_cause() const { return last_trap_cause_; }
  uint64_t last_trap_tval() const { return last_trap_tval_; }
  uint64_t last_trap_pc() const { return last_trap_pc_; }
  void FlushTlb();
  // Decoded pages dropped because their code was written (CPU store, device write).
  uint64_t code_invalidations() const { return code_invalidations_; }

 private:
  struct TlbEntry {
    uint64_t tag = ~0ull;   // (vaddr >> 12) << 2 | effective privilege
    uintptr_t addend = 0;   // host = vaddr + addend (RAM pages only)
  };
  static constexpr int kTlbSize = 512;
  enum class Access : uint8_t { kRead, kWrite, kFetch };

  // --- decoded-instruction cache + threaded dispatch (decode.cc) ---
  // One slot per 16-bit offset of a RAM page, decoded lazily on first execution.
  struct DecodedInsn {
    const void* handler;  // label inside RunDecoded()
    int32_t imm;          // immediate; slot delta for in-page jumps; the 32-bit insn for GENERIC/SYSTEM
    uint8_t rd, rs1, rs2; // rd = 32 (write sink) where x0 is the destination
    uint8_t len;          // instruction length in 16-bit slots (1 or 2)
  };
  static constexpr int kSlotsPerPage = 2048;
  struct DecodedPage {
    DecodedInsn insn[kSlotsPerPage + 1];  // + end-of-page sentinel
    uint8_t* host = nullptr;              // the RAM page
    uint64_t ppn = 0;                     // RAM page index (relative to ram_base_)
  };
  struct CodeTlbEntry {
    uint64_t tag = ~0ull;  // (vaddr >> 12) << 2 | privilege
    DecodedPage* page = nullptr;
  };
  static constexpr size_t kMaxDecodedPages = 512;  // then the whole cache is dropped
  // Runs up to n (> 0) instructions; returns the number executed. Returns early (at a
  // taken jump, page exit, SYSTEM instruction or trap) once attention_ is set.
  // n == 0 only publishes the handler table (constructor).
  uint64_t RunDecoded(uint64_t n);
  DecodedPage* LookupCodePage(uint64_t pc);  // code-TLB miss: translate, find/alloc; null = trap taken
  void DecodeSlot(DecodedPage* dp, DecodedInsn* s);
  void ResetDecodedPage(DecodedPage* dp);
  void InvalidateCodePage(uint64_t ppn);     // a store hit a page with decoded code
  void FlushDecodeCache();
  void DropWrittenCodePages();               // pages written by devices (DirtyLog code watch)
  void CheckDeviceCodeWrites() {
    if (dirty_log_ && dirty_log_->code_write_generation() != code_gen_seen_) DropWrittenCodePages();
  }
  void PurgeWriteTlbFor(const uint8_t* host_page);

  // --- execution (exec.cc) ---
  void Step();                        // one instruction
  void Execute32(uint32_t insn);      // pc_ points at the instruction; advances pc_ itself
  void ExecuteFp(uint32_t insn);      // OP-FP and fused ops (exec_fp.cc)
  bool ExecuteAmo(uint32_t insn);
  static uint32_t ExpandCompressed(uint16_t c);  // 0 = illegal
  // Expansion of every 16-bit encoding, computed once per process (read-only).
  static const uint32_t* CompressedTable();
  const uint32_t* compressed_table_ = CompressedTable();
  bool FetchSlow(uint64_t pc, uint32_t* insn, int* len);

  // --- memory (mmu.cc) ---
  template <typename T> bool Load(uint64_t va, T* out);
  template <typename T> bool Store(uint64_t va, T v);
  bool LoadSlow(uint64_t va, unsigned size, uint64_t* out);
  bool StoreSlow(uint64_t va, unsigned size, uint64_t v);
  // Translates va -> pa; raises the proper page fault and returns false on failure.
  bool Translate(uint64_t va, Access acc, uint64_t* pa, bool raise = true);
  int EffectivePriv(Access acc) const;
  bool PhysRead(uint64_t pa, unsigned size, uint64_t* v, Access acc);
  bool PhysWrite(uint64_t pa, unsigned size, uint64_t v);
  void FlushWriteTlb();
  // Caches va -> host pointer for a RAM page (no-op for MMIO).
  void FillTlb(TlbEntry* tlb, uint64_t va, uint64_t pa, int priv);
  void ServiceHarvestRequest();

  // --- CSRs, traps, interrupts (csr.cc) ---
  bool CsrRead(uint32_t csr, uint64_t* v, bool will_write);
  bool CsrWrite(uint32_t csr, uint64_t v);
  void RaiseException(uint64_t cause, uint64_t tval);
  void TakeTrap(uint64_t cause, uint64_t tval, bool interrupt);
  bool CheckInterrupts();            // returns true if one was taken
  void UpdateTimerLines(uint64_t now);
  uint64_t Mip() const { return mip_ | lines_.load(std::memory_order_relaxed); }
  void DoMret();
  void DoSret();
  bool FpEnabled() const { return (mstatus_ & kMstatusFS) != 0; }
  void MarkFsDirty() { mstatus_ |= kMstatusFS; }
  bool HandleEcall();
  // Stores the dirty mark 1 of a RAM page (after the data store) and counts the page in the
  // DirtyLog's activity counter when its mark was not 1 yet (guest_memory.h).
  void MarkWritten(uint64_t page) {
    if (__atomic_load_n(&dirty_marks_[page], __ATOMIC_RELAXED) != 1) newly_dirtied_->fetch_add(1, std::memory_order_relaxed);
    __atomic_store_n(&dirty_marks_[page], 1, __ATOMIC_RELEASE);
  }

  // --- state ---
  int hart_id_;
  VcpuEnv env_;
  uint8_t* ram_host_;
  uint64_t ram_base_;
  uint64_t ram_size_;
  uint8_t* dirty_marks_;
  std::atomic<uint64_t>* newly_dirtied_;  // DirtyLog::raw_newly_dirtied()

  uint64_t x_[33] = {};  // x_[32]: write sink for rd = x0 in decoded instructions (not architectural)
  uint64_t f_[32] = {};
  uint64_t pc_ = 0;
  int priv_ = kMachine;
  uint32_t fflags_ = 0, frm_ = 0;
  uint64_t mstatus_ = 0, misa_ = 0, medeleg_ = 0, mideleg_ = 0, mie_ = 0, mip_ = 0;
  uint64_t mtvec_ = 0, mscratch_ = 0, mepc_ = 0, mcause_ = 0, mtval_ = 0, mcounteren_ = 0;
  uint64_t stvec_ = 0, sscratch_ = 0, sepc_ = 0, scause_ = 0, stval_ = 0, satp_ = 0, scounteren_ = 0;
  uint64_t menvcfg_ = 0, senvcfg_ = 0, mcountinhibit_ = 0;
  uint64_t pmpcfg_[16] = {};
  uint64_t pmpaddr_[64] = {};
  uint64_t instret_ = 0;
  uint64_t reservation_ = ~0ull;
  bool wfi_ = false;
  int ilen_ = 4;            // length of the executing instruction (2 or 4)
  uint32_t raw_insn_ = 0;   // its raw bits (tval of an illegal-instruction trap)

  // Hardware-driven mip bits (MEIP/SEIP/MTIP/MSIP/STIP from devices and timers).
  std::atomic<uint64_t> lines_{0};
  // Timer deadlines (ticks); written by CLINT/SBI on the machine thread or others.
  std::atomic<uint64_t> mtimer_deadline_{UINT64_MAX};
  std::atomic<uint64_t> stimer_deadline_{UINT64_MAX};
  std::atomic<bool> exit_requested_{false};
  std::atomic<bool> attention_{false};  // anything above changed: re-check soon

  // Dirty-log harvest handshake: see guest_memory.h. GUARDED_BY(harvest_mu_).
  std::mutex harvest_mu_;
  std::condition_variable harvest_cv_;
  bool in_run_ = false;                 // GUARDED_BY(harvest_mu_)
  std::thread::id run_thread_;          // GUARDED_BY(harvest_mu_); the thread in Run() while in_run_
  uint64_t harvest_requested_ = 0;      // GUARDED_BY(harvest_mu_)
  uint64_t harvest_done_ = 0;           // GUARDED_BY(harvest_mu_)
  std::atomic<bool> harvest_pending_{false};

  TlbEntry tlb_read_[kTlbSize];
  TlbEntry tlb_write_[kTlbSize];
  TlbEntry tlb_code_[kTlbSize];

  bool host_trap_mode_ = false;
  bool host_trap_taken_ = false;
  uint64_t last_trap_cause_ = 0, last_trap_tval_ = 0, last_trap_pc_ = 0;
  int sbi_action_ = 0;  // SbiAction requested by the last SBI call

  VcpuCounters counters_;
  FILE* trace_ = nullptr;

  // Decode cache (not architectural state: dropped on restore/boot, never saved).
  // Invariant: code_watch_[ppn] != 0  =>  no tlb_write_ entry maps page ppn, so every CPU
  // store to a page with decoded code takes the slow path (PhysWrite), which drops the code.
  DirtyLog* dirty_log_ = nullptr;
  uint8_t* code_watch_ = nullptr;  // DirtyLog::raw_code_watch()
  uint64_t code_gen_seen_ = 0;
  std::vector<DecodedPage*> page_of_ppn_;
  std::vector<std::unique_ptr<DecodedPage>> decoded_pages_;
  size_t decoded_used_ = 0;
  uint64_t code_invalidations_ = 0;
  CodeTlbEntry code_tlb_[kTlbSize];
  static const void* const* handlers_;  // RunDecoded's label table
};

}  // namespace ferry::riscv
