// The CPU-backend interface. Devices, the VMM and migration talk to vCPUs only
// through this header -- never to a backend's internals -- so a KVM backend can
// be added beside the software RISC-V one (src/cpu/riscv).
//
// Threading: a Vcpu is driven by exactly one thread (the machine thread), which
// calls Run(). RequestExit() and SetInterruptLine() may be called from any thread.
// Everything else is called only while Run() is not executing.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "common/error.h"
#include "memory/bus.h"
#include "memory/guest_memory.h"

namespace ferry {

// Guest time: the platform timer (CLINT mtime), 10 MHz like QEMU virt.
// Snapshot/migration save Ticks() and restore an offset so guest time never jumps.
class TimeSource {
 public:
  virtual ~TimeSource() = default;
  virtual uint64_t Ticks() const = 0;
};

// Hardware interrupt lines into a hart (bits of mip).
enum class InterruptLine : uint8_t {
  kSupervisorSoftware = 1,  // SSIP
  kMachineSoftware = 3,     // MSIP (CLINT)
  kSupervisorTimer = 5,     // STIP (driven by the in-VMM SBI timer)
  kMachineTimer = 7,        // MTIP (CLINT mtimecmp)
  kSupervisorExternal = 9,  // SEIP (PLIC S context)
  kMachineExternal = 11,    // MEIP (PLIC M context)
};

// An SBI call made by the guest kernel (ecall from S-mode). The VMM implements SBI
// (no firmware in the guest). a0..a7 in; the handler sets error/value (a0/a1).
struct SbiCall {
  uint64_t args[6];  // a0..a5
  uint64_t fid;      // a6
  uint64_t eid;      // a7
  int64_t error = 0;
  uint64_t value = 0;
};

// What the VMM wants after an SBI call.
enum class SbiAction : uint8_t { kContinue, kShutdown, kReset };

class SbiHandler {
 public:
  virtual ~SbiHandler() = default;
  virtual SbiAction HandleSbi(int hart_id, SbiCall& call) = 0;
};

// Everything a vCPU backend needs from the machine.
struct VcpuEnv {
  GuestMemory* memory = nullptr;  // RAM (fast path) + dirty log
  MmioBus* bus = nullptr;         // everything that is not RAM
  TimeSource* time = nullptr;     // for the `time` CSR and WFI wake-up deadlines
  SbiHandler* sbi = nullptr;      // null: ecall from S traps to M as usual
};

enum class VcpuExitReason : uint8_t {
  kBudgetExhausted,  // ran max_instructions
  kExitRequested,    // RequestExit() was called
  kWaitForInterrupt, // WFI with no pending interrupt: caller may sleep until an event/timer
  kShutdown,         // guest asked to power off (SBI SRST or similar)
  kReset,            // guest asked to reboot
  kFatal,            // backend cannot continue (e.g. double fault loop); message in error
  kHostTrap,         // test harness mode only: a trap was taken and returned to the host
};

struct VcpuRunResult {
  VcpuExitReason reason;
  uint64_t instructions = 0;  // retired during this Run()
  std::string error;          // for kFatal
};

struct VcpuCounters {
  uint64_t instructions_retired = 0;
  uint64_t exceptions = 0;
  uint64_t interrupts = 0;
  uint64_t tlb_misses = 0;
  uint64_t mmio_accesses = 0;
  uint64_t wfi_exits = 0;
};

class Vcpu : public HarvestListener {
 public:
  ~Vcpu() override = default;

  virtual int hart_id() const = 0;

  // Sets the boot state: pc, a0 = hart id, a1 = device tree address, privilege
  // (0 U, 1 S, 3 M). With an SbiHandler the kernel is entered in S-mode directly.
  virtual void SetBootState(uint64_t pc, uint64_t a0, uint64_t a1, int privilege) = 0;

  // Executes until the budget is used, RequestExit(), WFI, shutdown or fatal error.
  virtual VcpuRunResult Run(uint64_t max_instructions) = 0;
  // Asynchronously asks Run() to return soon (kExitRequested). Thread-safe.
  virtual void RequestExit() = 0;

  // Level-triggered interrupt line (thread-safe).
  virtual void SetInterruptLine(InterruptLine line, bool level) = 0;
  // Earliest time (TimeSource ticks) at which a timer interrupt becomes pending for
  // this hart, or UINT64_MAX; used to bound WFI sleeps. Set by CLINT / SBI timer.
  virtual void SetTimerDeadline(InterruptLine line, uint64_t ticks) = 0;
  virtual uint64_t NextTimerDeadline() const = 0;

  // Complete architectural state (versioned blob, see common/state_io.h).
  virtual std::vector<uint8_t> SaveState() const = 0;
  virtual Status RestoreState(std::span<const uint8_t> blob) = 0;

  virtual VcpuCounters counters() const = 0;

  // Gentle throttling seam (roadmap): fraction of each time slice the vCPU may run.
  virtual void SetDutyCycle(double /*fraction*/) {}
};

// Backend factory for the software RV64GC CPU (src/cpu/riscv).
std::unique_ptr<Vcpu> CreateRiscvVcpu(int hart_id, const VcpuEnv& env);

}  // namespace ferry
