// Spec-based unit tests of the RV64 hart: executor edge cases, traps, interrupts, MMU,
// faults, WFI, save/restore and dirty tracking. Programs are hand-encoded.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "cpu/riscv/riscv_cpu.h"

namespace ferry::riscv {
namespace {

constexpr uint64_t kBase = 0x80000000, kSize = 16 << 20;

// Minimal encoders.
uint32_t R(uint32_t f7, uint32_t rs2, uint32_t rs1, uint32_t f3, uint32_t rd, uint32_t op) {
  return (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op;
}
uint32_t I(int32_t imm, uint32_t rs1, uint32_t f3, uint32_t rd, uint32_t op) {
  return (static_cast<uint32_t>(imm & 0xfff) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op;
}
uint32_t S(int32_t imm, uint32_t rs2, uint32_t rs1, uint32_t f3) {
  uint32_t u = static_cast<uint32_t>(imm);
  return (((u >> 5) & 0x7f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((u & 0x1f) << 7) | 0x23;
}
uint32_t Addi(uint32_t rd, uint32_t rs1, int32_t imm) { return I(imm, rs1, 0, rd, 0x13); }
uint32_t Ld(uint32_t rd, uint32_t rs1, int32_t imm) { return I(imm, rs1, 3, rd, 0x03); }
uint32_t Sd(uint32_t rs2, uint32_t rs1, int32_t imm) { return S(imm, rs2, rs1, 3); }
uint32_t Csrrw(uint32_t rd, uint32_t csr, uint32_t rs1) { return (csr << 20) | (rs1 << 15) | (1 << 12) | (rd << 7) | 0x73; }
uint32_t Csrrs(uint32_t rd, uint32_t csr, uint32_t rs1) { return (csr << 20) | (rs1 << 15) | (2 << 12) | (rd << 7) | 0x73; }
constexpr uint32_t kEcall = 0x00000073, kMret = 0x30200073, kSret = 0x10200073, kWfi = 0x10500073;
uint32_t Jal0() { return 0x0000006f; }  // jal x0, 0 (spin)

class CpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::move(*GuestMemory::Create(kBase, kSize));
    env_ = VcpuEnv{mem_.get(), &bus_, nullptr, nullptr};
    cpu_ = std::make_unique<RiscvCpu>(0, env_);
  }
  void Put(uint64_t addr, std::initializer_list<uint32_t> code) {
    for (uint32_t w : code) {
      ASSERT_TRUE(mem_->Write(addr, &w, 4));
      addr += 4;
    }
  }
  void Put64(uint64_t addr, uint64_t v) { ASSERT_TRUE(mem_->Write(addr, &v, 8)); }
  uint64_t Get64(uint64_t addr) {
    uint64_t v = 0;
    EXPECT_TRUE(mem_->Read(addr, &v, 8));
    return v;
  }
  // Runs exactly n instructions.
  void Steps(uint64_t n) { cpu_->Run(n); }

  std::unique_ptr<GuestMemory> mem_;
  MmioBus bus_;
  VcpuEnv env_;
  std::unique_ptr<RiscvCpu> cpu_;
};

TEST_F(CpuTest, DivisionEdgeCasesFollowTheSpec) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->set_x(5, 0x8000000000000000ull);  // INT64_MIN
  cpu_->set_x(6, ~0ull);                  // -1
  cpu_->set_x(7, 0);
  Put(kBase, {R(1, 6, 5, 4, 10, 0x33),    // div a0 = MIN / -1 -> MIN
              R(1, 6, 5, 6, 11, 0x33),    // rem a1 = 0
              R(1, 7, 5, 4, 12, 0x33),    // div by zero -> -1
              R(1, 7, 5, 5, 13, 0x33),    // divu by zero -> all ones
              R(1, 7, 5, 6, 14, 0x33),    // rem by zero -> dividend
              R(1, 6, 5, 4, 15, 0x3b),    // divw: low words 0 / -1 = 0
              I(-1, 0, 0, 0, 0x13)});     // addi x0, x0, -1: x0 stays 0
  Steps(7);
  EXPECT_EQ(cpu_->x(10), 0x8000000000000000ull);
  EXPECT_EQ(cpu_->x(11), 0u);
  EXPECT_EQ(cpu_->x(12), ~0ull);
  EXPECT_EQ(cpu_->x(13), ~0ull);
  EXPECT_EQ(cpu_->x(14), 0x8000000000000000ull);
  EXPECT_EQ(cpu_->x(15), 0u);
  EXPECT_EQ(cpu_->x(0), 0u);
}

TEST_F(CpuTest, IllegalInstructionTrapsWithTval) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->WriteCsrForTest(0x305, kBase + 0x100);  // mtvec
  Put(kBase, {0xffffffffu});
  Steps(1);
  EXPECT_EQ(cpu_->pc(), kBase + 0x100);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x342), kCauseIllegal);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x343), 0xffffffffu);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x341), kBase);
  // Reserved compressed encoding (all zero) is illegal too.
  cpu_->set_pc(kBase + 0x200);
  Steps(1);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x342), kCauseIllegal);
}

TEST_F(CpuTest, EcallFromUserIsDelegatedToSupervisorAndSretReturns) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->WriteCsrForTest(0x302, 1 << kCauseEcallU);  // medeleg
  cpu_->WriteCsrForTest(0x105, kBase + 0x400);      // stvec
  cpu_->WriteCsrForTest(0x341, kBase + 0x100);      // mepc -> user code
  cpu_->WriteCsrForTest(0x300, 0);                  // MPP = U
  Put(kBase, {kMret});
  Put(kBase + 0x100, {kEcall, Addi(10, 0, 42)});
  Put(kBase + 0x400, {Csrrs(11, 0x141, 0), Addi(11, 11, 4), Csrrw(0, 0x141, 11), kSret});
  Steps(2);  // mret, ecall
  EXPECT_EQ(cpu_->priv(), kSupervisor);
  EXPECT_EQ(cpu_->pc(), kBase + 0x400);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kCauseEcallU);  // scause
  EXPECT_EQ(cpu_->ReadCsrForTest(0x300) & kMstatusSPP, 0u);  // came from U
  Steps(4);  // handler: sepc += 4; sret
  EXPECT_EQ(cpu_->priv(), kUser);
  EXPECT_EQ(cpu_->pc(), kBase + 0x104);
  Steps(1);
  EXPECT_EQ(cpu_->x(10), 42u);
}

class FakeTime : public TimeSource {
 public:
  uint64_t Ticks() const override { return now; }
  uint64_t now = 1000;
};

TEST_F(CpuTest, SupervisorTimerInterruptRespectsEnablesAndVectoredMode) {
  FakeTime t;
  env_.time = &t;
  cpu_ = std::make_unique<RiscvCpu>(0, env_);
  cpu_->SetBootState(kBase, 0, 0, kSupervisor);      // delegates S interrupts
  cpu_->WriteCsrForTest(0x105, (kBase + 0x800) | 1);  // stvec vectored
  cpu_->WriteCsrForTest(0x104, 1 << 5);              // sie.STIE
  Put(kBase, {Jal0()});
  cpu_->SetTimerDeadline(InterruptLine::kSupervisorTimer, 2000);
  Steps(10);
  EXPECT_EQ(cpu_->pc(), kBase) << "SIE clear: no interrupt";
  cpu_->WriteCsrForTest(0x100, kMstatusSIE);  // sstatus.SIE
  Steps(10);
  EXPECT_EQ(cpu_->pc(), kBase) << "deadline not reached";
  t.now = 2000;
  Steps(0);  // Run(0): take pending interrupts, execute nothing
  EXPECT_EQ(cpu_->pc(), kBase + 0x800 + 4 * 5);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kInterruptBit | 5);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x100) & kMstatusSIE, 0u);
}

TEST_F(CpuTest, WfiReturnsToTheCallerAndWakesOnInterrupt) {
  FakeTime t;
  env_.time = &t;
  cpu_ = std::make_unique<RiscvCpu>(0, env_);
  cpu_->SetBootState(kBase, 0, 0, kSupervisor);
  cpu_->WriteCsrForTest(0x104, 1 << 5);
  Put(kBase, {kWfi, Jal0()});
  cpu_->SetTimerDeadline(InterruptLine::kSupervisorTimer, 5000);
  auto r = cpu_->Run(1000);
  EXPECT_EQ(r.reason, VcpuExitReason::kWaitForInterrupt);
  EXPECT_EQ(cpu_->NextTimerDeadline(), 5000u);
  t.now = 6000;  // pending (not enabled globally: SIE=0) still wakes WFI
  r = cpu_->Run(5);
  EXPECT_EQ(r.reason, VcpuExitReason::kBudgetExhausted);
  EXPECT_EQ(cpu_->pc(), kBase + 4);
}

// Builds an identity-style mapping of VA 0x40000000 -> PA kBase+0x100000 with the given PTE flags.
class MmuTest : public CpuTest {
 protected:
  static constexpr uint64_t kRoot = kBase + 0x10000, kL1 = kBase + 0x11000, kL0 = kBase + 0x12000, kL2 = kBase + 0x13000;
  static constexpr uint64_t kVa = 0x40000000, kPa = kBase + 0x100000;
  void MapSv39(uint64_t flags) {
    Put64(kRoot + 8 * ((kVa >> 30) & 0x1ff), ((kL1 >> 12) << 10) | 1);
    Put64(kL1 + 8 * ((kVa >> 21) & 0x1ff), ((kL0 >> 12) << 10) | 1);
    Put64(kL0 + 8 * ((kVa >> 12) & 0x1ff), ((kPa >> 12) << 10) | flags);
    cpu_->WriteCsrForTest(0x180, (8ull << 60) | (kRoot >> 12));
  }
  uint64_t Pte() { return Get64(kL0 + 8 * ((kVa >> 12) & 0x1ff)); }
  void EnterS(uint64_t pc) {
    cpu_->SetBootState(pc, 0, 0, kSupervisor);
    cpu_->WriteCsrForTest(0x105, kBase + 0x900);  // stvec
  }
};

TEST_F(MmuTest, Sv39WalkSetsAccessedAndDirtyBits) {
  Put64(kPa, 0x1122334455667788ull);
  MapSv39(0x1 | 0x2 | 0x4);  // V R W, A/D clear
  cpu_->set_x(5, kVa);
  Put(kBase, {Ld(6, 5, 0), Sd(6, 5, 8)});
  EnterS(kBase);
  cpu_->WriteCsrForTest(0x180, (8ull << 60) | (kRoot >> 12));
  // Code runs from a bare-identity region? No: S-mode code must be mapped too.
  Put64(kRoot + 8 * ((kBase >> 30) & 0x1ff), ((kBase >> 12) << 10) | 0xcf);  // 1 GiB RWX superpage, A+D
  Steps(1);
  EXPECT_EQ(cpu_->x(6), 0x1122334455667788ull);
  EXPECT_EQ(Pte() & 0xc0, 0x40u) << "load sets A only";
  Steps(1);
  EXPECT_EQ(Pte() & 0xc0, 0xc0u) << "store sets D";
  EXPECT_EQ(Get64(kPa + 8), 0x1122334455667788ull);
}

TEST_F(MmuTest, PermissionFaultsAndSum) {
  MapSv39(0x1 | 0x2 | 0x10 | 0x40);  // V R U A: user, read-only
  Put64(kRoot + 8 * ((kBase >> 30) & 0x1ff), ((kBase >> 12) << 10) | 0xcf);
  cpu_->set_x(5, kVa);
  Put(kBase, {Sd(0, 5, 0)});
  EnterS(kBase);
  cpu_->WriteCsrForTest(0x180, (8ull << 60) | (kRoot >> 12));
  Steps(1);  // S touching a U page without SUM: page fault even for a store
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kCauseStorePage);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x143), kVa);
  // With SUM, a load works but the store still faults (not writable).
  cpu_->WriteCsrForTest(0x100, 1ull << 18);
  Put(kBase, {Ld(6, 5, 0), Sd(0, 5, 0)});
  cpu_->set_pc(kBase);
  Steps(1);
  EXPECT_EQ(cpu_->pc(), kBase + 4);
  Steps(1);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kCauseStorePage);
}

TEST_F(MmuTest, Sv48FourLevelWalk) {
  const uint64_t va = 0x0000400000001000ull;  // bit 46 set: needs the 4th level
  Put64(kRoot + 8 * ((va >> 39) & 0x1ff), ((kL2 >> 12) << 10) | 1);
  Put64(kL2 + 8 * ((va >> 30) & 0x1ff), ((kL1 >> 12) << 10) | 1);
  Put64(kL1 + 8 * ((va >> 21) & 0x1ff), ((kL0 >> 12) << 10) | 1);
  Put64(kL0 + 8 * ((va >> 12) & 0x1ff), ((kPa >> 12) << 10) | 0xc7);
  Put64(kRoot + 8 * ((kBase >> 39) & 0x1ff), ((kL1 >> 12) << 10) | 1);  // code: reuse kL1 for VA kBase? build separately
  // Map code with a 1 GiB superpage at level 2 through a dedicated table.
  const uint64_t kCodeL2 = kBase + 0x14000;
  Put64(kRoot + 8 * ((kBase >> 39) & 0x1ff), ((kCodeL2 >> 12) << 10) | 1);
  Put64(kCodeL2 + 8 * ((kBase >> 30) & 0x1ff), ((kBase >> 12) << 10) | 0xcf);
  Put64(kPa, 0xabcdef);
  cpu_->set_x(5, va);
  Put(kBase, {Ld(6, 5, 0)});
  EnterS(kBase);
  cpu_->WriteCsrForTest(0x180, (9ull << 60) | (kRoot >> 12));
  Steps(1);
  EXPECT_EQ(cpu_->x(6), 0xabcdefu);
  // A non-canonical address faults.
  cpu_->set_x(5, 0x0001000000000000ull);
  cpu_->set_pc(kBase);
  Steps(1);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kCauseLoadPage);
}

TEST_F(CpuTest, MisalignedAmoAndUnmappedPhysicalAddressFault) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->WriteCsrForTest(0x305, kBase + 0x100);
  cpu_->set_x(5, kBase + 0x1003);
  Put(kBase, {R(0, 6, 5, 3, 7, 0x2f)});  // amoadd.d x7, x6, (x5)
  Steps(1);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x342), kCauseMisalignedStore);
  cpu_->set_x(5, 0x40000000);  // nothing mapped there in M-mode physical space
  Put(kBase, {Ld(6, 5, 0)});
  cpu_->set_pc(kBase);
  Steps(1);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x342), kCauseLoadAccess);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x343), 0x40000000u);
  // A misaligned plain load inside RAM is performed (no trap).
  Put64(kBase + 0x2000, 0x0807060504030201ull);
  Put64(kBase + 0x2008, 0x100f0e0d0c0b0a09ull);
  cpu_->set_x(5, kBase + 0x2003);
  cpu_->set_pc(kBase);
  Steps(1);
  EXPECT_EQ(cpu_->x(6), 0x0b0a090807060504ull);
}

TEST_F(CpuTest, SaveRestoreRoundTripAndRejectsCorruptBlobs) {
  cpu_->SetBootState(kBase + 0x40, 7, 9, kSupervisor);
  cpu_->set_x(20, 0xdeadbeef);
  cpu_->set_f(3, 0x400921fb54442d18ull);
  cpu_->WriteCsrForTest(0x180, (8ull << 60) | 0x1234);
  auto blob = cpu_->SaveState();
  auto other = std::make_unique<RiscvCpu>(0, env_);
  ASSERT_TRUE(other->RestoreState(blob));
  EXPECT_EQ(other->pc(), kBase + 0x40);
  EXPECT_EQ(other->x(20), 0xdeadbeefu);
  EXPECT_EQ(other->f(3), 0x400921fb54442d18ull);
  EXPECT_EQ(other->priv(), kSupervisor);
  EXPECT_EQ(other->ReadCsrForTest(0x180), (8ull << 60) | 0x1234);
  EXPECT_EQ(other->SaveState(), blob);
  // Truncations, a wrong version and trailing bytes are rejected, leaving the hart untouched.
  for (size_t len : {size_t{0}, size_t{3}, size_t{100}, blob.size() - 1}) {
    auto s = other->RestoreState(std::span<const uint8_t>(blob.data(), len));
    EXPECT_FALSE(s) << len;
  }
  auto v = blob;
  v[0] = 7;
  EXPECT_EQ(other->RestoreState(v).error().code(), ErrorCode::kVersionMismatch);
  auto t = blob;
  t.push_back(0);
  EXPECT_FALSE(other->RestoreState(t));
  auto bad_priv = blob;
  bad_priv[4 + 64 * 8 + 8] = 2;  // privilege field = reserved value 2
  EXPECT_FALSE(other->RestoreState(bad_priv));
  // mstatus (after pc, priv, fflags, frm) with the reserved MPP 2, or a bit the hart does not keep.
  const size_t mstatus_at = 4 + 64 * 8 + 8 + 1 + 4 + 4;
  for (const uint64_t bad : {uint64_t{2} << 11, uint64_t{1} << 40, uint64_t{1} << 63}) {
    auto b = blob;
    uint64_t m;
    std::memcpy(&m, b.data() + mstatus_at, 8);
    m = (m & ~(uint64_t{3} << 11)) | bad;
    std::memcpy(b.data() + mstatus_at, &m, 8);
    auto s = other->RestoreState(b);
    ASSERT_FALSE(s) << std::hex << bad;
    EXPECT_NE(s.error().message().find("mstatus"), std::string::npos) << s.error().message();
  }
  EXPECT_EQ(other->pc(), kBase + 0x40);
}

TEST_F(CpuTest, StoresAfterHarvestAreMarkedAgainWithConcurrentHarvester) {
  // Guest: loop storing to one page forever: sd x6, 0(x5); jal back.
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->set_x(5, kBase + 0x5000);
  Put(kBase, {Sd(6, 5, 0), Addi(6, 6, 1), 0xff9ff06fu});  // jal x0, -8
  auto& log = mem_->dirty_log();
  const uint64_t page = 5;
  std::atomic<bool> stop{false};
  std::thread runner([&] {
    while (!stop.load()) cpu_->Run(100000);
  });
  int remarked = 0;
  for (int round = 0; round < 50; ++round) {
    auto bitmap = log.Harvest();
    // After Harvest() returned, the running vCPU must re-mark the page on its next store
    // (bounded wait: the runner thread may not be scheduled immediately on a busy machine).
    for (int i = 0; i < 2000 && !log.IsDirty(page); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (log.IsDirty(page)) remarked++;
    (void)bitmap;
  }
  stop.store(true);
  cpu_->RequestExit();
  runner.join();
  EXPECT_EQ(remarked, 50);
  // And with the vCPU not running, Harvest() must not block.
  (void)log.Harvest();
  EXPECT_FALSE(log.IsDirty(page));
}


// --- Decoded-instruction cache: self-modifying code, precise traps, device writes ---

constexpr uint32_t kFenceI = 0x0000100f;
uint32_t Sw(uint32_t rs2, uint32_t rs1, int32_t imm) { return S(imm, rs2, rs1, 2); }
uint32_t Jal(uint32_t rd, int32_t imm) {
  uint32_t u = static_cast<uint32_t>(imm);
  return (((u >> 20) & 1) << 31) | (((u >> 1) & 0x3ff) << 21) | (((u >> 11) & 1) << 20) | (((u >> 12) & 0xff) << 12) |
         (rd << 7) | 0x6f;
}

TEST_F(CpuTest, StoreOverAnExecutedInstructionThenFenceIRunsTheNewInstruction) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->set_x(5, kBase);
  cpu_->set_x(6, Addi(10, 0, 100));
  Put(kBase, {Addi(10, 0, 1),   // T: replaced below
              Sw(6, 5, 0),      // T := x6
              kFenceI,
              Jal(0, -12)});    // back to T
  Steps(4);
  EXPECT_EQ(cpu_->x(10), 1u) << "first pass runs the original T";
  Steps(1);
  EXPECT_EQ(cpu_->x(10), 100u) << "after sw + fence.i the new T runs";
  // Second modification of the same, re-executed page: the store must not slip through a
  // cached write permission taken by the first store.
  cpu_->set_x(6, Addi(10, 0, 7));
  Steps(4);  // sw, fence.i, jal, T
  EXPECT_EQ(cpu_->x(10), 7u);
  // An instruction ahead of the store in the same straight-line run, decoded by an earlier pass.
  Put(kBase + 0x100, {Sw(6, 5, 8), kFenceI, Addi(11, 0, 1), Jal(0, 0)});
  cpu_->set_x(5, kBase + 0x100);
  cpu_->set_x(6, Addi(11, 0, 1));  // first pass: rewrite with the same word
  cpu_->set_pc(kBase + 0x100);
  Steps(3);
  EXPECT_EQ(cpu_->x(11), 1u);
  cpu_->set_x(6, Addi(11, 0, 2));
  cpu_->set_x(11, 0);
  cpu_->set_pc(kBase + 0x100);
  Steps(3);
  EXPECT_EQ(cpu_->x(11), 2u);
}

TEST_F(CpuTest, TrapInTheMiddleOfADecodedBlockIsPrecise) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->WriteCsrForTest(0x305, kBase + 0x800);  // mtvec
  Put(kBase + 0x800, {Jal0()});
  Put64(kBase + 0x2000, 0x1234);
  // c.li a0,1; c.li a1,2 | ld a2,0(t0) | c.li a3,3; c.nop | jal x0,0
  Put(kBase, {0x45894505u, Ld(12, 5, 0), 0x0001468du, Jal0()});
  cpu_->set_x(5, kBase + 0x2000);
  auto r = cpu_->Run(6);  // whole block once: it is decoded now
  EXPECT_EQ(r.instructions, 6u);
  EXPECT_EQ(cpu_->x(12), 0x1234u);
  EXPECT_EQ(cpu_->x(13), 3u);
  for (int i : {10, 11, 12, 13}) cpu_->set_x(i, 0);
  cpu_->set_x(5, 0x40000000);  // nothing there: load access fault
  cpu_->set_pc(kBase);
  r = cpu_->Run(3);  // c.li, c.li, ld (faults)
  EXPECT_EQ(r.instructions, 3u);
  EXPECT_EQ(cpu_->pc(), kBase + 0x800);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x342), kCauseLoadAccess);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x341), kBase + 4) << "mepc is the faulting ld";
  EXPECT_EQ(cpu_->ReadCsrForTest(0x343), 0x40000000u);
  EXPECT_EQ(cpu_->x(10), 1u);
  EXPECT_EQ(cpu_->x(11), 2u);
  EXPECT_EQ(cpu_->x(13), 0u) << "nothing after the fault ran";

  // Same in S-mode (delegated): sepc, and an illegal instruction after a compressed one.
  cpu_->SetBootState(kBase + 0x1000, 0, 0, kSupervisor);
  cpu_->WriteCsrForTest(0x105, kBase + 0x800);  // stvec
  Put(kBase + 0x1000, {Addi(10, 0, 5), 0x00004505u /* c.li a0,1 ; illegal c.unimp */, Addi(11, 0, 9)});
  r = cpu_->Run(3);
  EXPECT_EQ(r.instructions, 3u);
  EXPECT_EQ(cpu_->priv(), kSupervisor);
  EXPECT_EQ(cpu_->pc(), kBase + 0x800);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kCauseIllegal);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x141), kBase + 0x1006) << "sepc is the 16-bit illegal instruction";
  EXPECT_EQ(cpu_->x(10), 1u);
  EXPECT_EQ(cpu_->x(11), 0u);
}

// An MMIO device that, like a virtio device completing a request, writes guest RAM
// through GuestMemory while the CPU's store to its register is being executed.
class DmaDevice : public MmioDevice {
 public:
  explicit DmaDevice(GuestMemory* m) : mem_(m) {}
  bool MmioRead(uint64_t, unsigned, uint64_t* v) override { *v = 0; return true; }
  bool MmioWrite(uint64_t, unsigned, uint64_t) override {
    if (armed) {
      EXPECT_TRUE(mem_->Write(target, &word, 4));
    }
    return true;
  }
  bool armed = false;
  uint64_t target = 0;
  uint32_t word = 0;

 private:
  GuestMemory* mem_;
};

TEST_F(CpuTest, CodeOverwrittenByADeviceWriteIsExecutedFresh) {
  DmaDevice dev(mem_.get());
  ASSERT_TRUE(bus_.Register(0x10000000, 0x1000, &dev, "dma"));
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  // Between runs: the VMM (loader, a device on the machine thread) rewrites executed code.
  Put(kBase, {Addi(10, 0, 1), Jal0()});
  Steps(2);
  EXPECT_EQ(cpu_->x(10), 1u);
  Put(kBase, {Addi(10, 0, 2)});
  cpu_->set_pc(kBase);
  Steps(1);
  EXPECT_EQ(cpu_->x(10), 2u);

  // During a run: a store to the device's register makes it overwrite an instruction
  // further down the page that is executing (already decoded by a first pass).
  cpu_->set_x(5, 0x10000000);
  Put(kBase + 0x200, {Addi(11, 0, 1), Sw(0, 5, 0), Addi(0, 0, 0), Addi(12, 0, 1), Jal0()});
  cpu_->set_pc(kBase + 0x200);
  Steps(5);
  EXPECT_EQ(cpu_->x(12), 1u);
  dev.armed = true;
  dev.target = kBase + 0x20c;
  dev.word = Addi(12, 0, 2);
  cpu_->set_x(12, 0);
  cpu_->set_pc(kBase + 0x200);
  Steps(4);
  EXPECT_EQ(cpu_->x(12), 2u);
  EXPECT_EQ(cpu_->pc(), kBase + 0x210);
}

// Like the balloon processing a free page report on the store to its notify register:
// discards guest pages (DirtyLog::MarkFreed -> OnDirtyLogHarvest) from inside Run(), on
// the vCPU's own thread.
class FreeingDevice : public MmioDevice {
 public:
  explicit FreeingDevice(GuestMemory* m) : mem_(m) {}
  bool MmioRead(uint64_t, unsigned, uint64_t* v) override { *v = 0; return true; }
  bool MmioWrite(uint64_t, unsigned, uint64_t) override {
    calls++;
    EXPECT_TRUE(mem_->Discard(target, 4096));
    return true;
  }
  std::atomic<int> calls{0};
  uint64_t target = 0;

 private:
  GuestMemory* mem_;
};

// Runs `fn` on another thread and fails (instead of hanging) if it does not finish.
template <typename F>
void WithoutDeadlock(F fn) {
  std::atomic<bool> done{false};
  std::thread t([&] { fn(); done.store(true); });
  for (int i = 0; i < 20000 && !done.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!done.load()) {
    fprintf(stderr, "deadlock: a free report from inside Run() did not return\n");
    std::_Exit(1);
  }
  t.join();
}

TEST_F(CpuTest, PagesFreedFromInsideRunAreMarkedWrittenByTheNextStoreEvenInTheSameBlock) {
  FreeingDevice dev(mem_.get());
  ASSERT_TRUE(bus_.Register(0x10000000, 0x1000, &dev, "freeing"));
  const uint64_t page_va = kBase + 0x5000, page = 5;
  dev.target = page_va;
  auto& log = mem_->dirty_log();
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->set_x(5, page_va);
  cpu_->set_x(6, 0x1122334455667788ull);
  cpu_->set_x(7, 0x10000000);
  // First pass: the page is written (slow path, then through the write TLB), then freed by
  // the device while Run() executes the store to its register; nothing writes it afterwards.
  Put(kBase, {Sd(6, 5, 0), Sd(6, 5, 8), Sw(0, 7, 0), Jal0()});
  WithoutDeadlock([&] { cpu_->Run(4); });
  EXPECT_EQ(dev.calls.load(), 1);
  EXPECT_TRUE(log.IsFreed(page)) << "freed after the last write: 2";
  EXPECT_EQ(Get64(page_va), 0u) << "contents discarded";

  // Second pass: written through the (re-filled) write TLB, freed, then written again by the
  // very next instruction of the same straight-line block: the mark must end up 1.
  (void)log.Harvest();
  Put(kBase + 0x100, {Sd(6, 5, 0), Sd(6, 5, 16), Sw(0, 7, 0), Sd(6, 5, 24), Jal0()});
  cpu_->set_pc(kBase + 0x100);
  WithoutDeadlock([&] { cpu_->Run(5); });
  EXPECT_EQ(dev.calls.load(), 2);
  EXPECT_TRUE(log.IsDirty(page));
  EXPECT_FALSE(log.IsFreed(page)) << "a write after the free report must store 1";
  EXPECT_EQ(Get64(page_va + 24), 0x1122334455667788ull);
  EXPECT_EQ(Get64(page_va), 0u);
  std::vector<uint64_t> dirty, freed;
  log.Harvest(&dirty, &freed);
  EXPECT_TRUE((dirty[0] >> page) & 1);
  EXPECT_FALSE((freed[0] >> page) & 1);
}

TEST_F(CpuTest, FreeReportsInsideRunAndAConcurrentHarvesterDoNotDeadlock) {
  FreeingDevice dev(mem_.get());
  ASSERT_TRUE(bus_.Register(0x10000000, 0x1000, &dev, "freeing"));
  dev.target = kBase + 0x6000;
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->set_x(5, kBase + 0x6000);
  cpu_->set_x(7, 0x10000000);
  // Loop: write the page, free it, write it again.
  Put(kBase, {Sd(6, 5, 0), Sw(0, 7, 0), Sd(6, 5, 8), Addi(6, 6, 1), Jal(0, -16)});
  std::atomic<bool> stop{false};
  std::thread harvester([&] {
    std::vector<uint64_t> dirty, freed;
    while (!stop.load()) mem_->dirty_log().Harvest(&dirty, &freed);
  });
  WithoutDeadlock([&] {
    for (int i = 0; i < 200; ++i) cpu_->Run(5000);
  });
  stop.store(true);
  harvester.join();
  EXPECT_GT(dev.calls.load(), 1000);
  // The loop always ends an iteration with a write after the free: once the harvester stopped,
  // one more iteration leaves the page written.
  cpu_->Run(5);
  EXPECT_TRUE(mem_->dirty_log().IsDirty(6));
  EXPECT_FALSE(mem_->dirty_log().IsFreed(6));
}

}  // namespace
}  // namespace ferry::riscv

namespace ferry::riscv {
namespace {

constexpr uint32_t kSfenceVma = 0x12000073;

TEST_F(MmuTest, DecodedCodeFollowsARemappedPageAfterSfenceVma) {
  // The same virtual page first maps physical page A, then B; both hold decoded code.
  const uint64_t a = kPa, b = kPa + 0x1000;
  Put64(kRoot + 8 * ((kBase >> 30) & 0x1ff), ((kBase >> 12) << 10) | 0xcf);  // stvec and tables
  Put(a, {Addi(10, 0, 1), kSfenceVma, Jal(0, -8)});
  Put(b, {Addi(10, 0, 2), kSfenceVma, Jal(0, -8)});
  MapSv39(0x1 | 0x2 | 0x8 | 0x40);  // V R X A
  EnterS(kVa);
  cpu_->WriteCsrForTest(0x180, (8ull << 60) | (kRoot >> 12));
  Steps(3);  // addi, sfence, jal: page A decoded
  EXPECT_EQ(cpu_->x(10), 1u);
  EXPECT_EQ(cpu_->pc(), kVa);
  Steps(1);  // addi (A)
  Put64(kL0 + 8 * ((kVa >> 12) & 0x1ff), ((b >> 12) << 10) | 0x1 | 0x2 | 0x8 | 0x40);
  cpu_->set_x(10, 0);
  Steps(3);  // sfence (A, or B: same instruction), jal (B), addi (B)
  EXPECT_EQ(cpu_->x(10), 2u) << "after sfence.vma the new mapping's code runs";
  EXPECT_EQ(cpu_->pc(), kVa + 4);
}

TEST_F(MmuTest, CodeDecodedInSupervisorModeStillFaultsWhenFetchedFromUserMode) {
  Put64(kRoot + 8 * ((kBase >> 30) & 0x1ff), ((kBase >> 12) << 10) | 0xcf);  // S-only RWX superpage
  Put(kPa, {Addi(10, 10, 1), kSret});
  Put(kBase + 0x900, {Jal0()});
  MapSv39(0x1 | 0x2 | 0x8 | 0x40);  // V R X A, no U
  EnterS(kVa);
  cpu_->WriteCsrForTest(0x180, (8ull << 60) | (kRoot >> 12));
  cpu_->WriteCsrForTest(0x141, kVa);  // sepc; sstatus.SPP = 0: sret goes to U
  Steps(2);
  EXPECT_EQ(cpu_->priv(), kUser);
  EXPECT_EQ(cpu_->pc(), kVa);
  Steps(1);  // U fetches the decoded S page: instruction page fault, delegated to S
  EXPECT_EQ(cpu_->priv(), kSupervisor);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x142), kCauseFetchPage);
  EXPECT_EQ(cpu_->ReadCsrForTest(0x141), kVa);
  EXPECT_EQ(cpu_->pc(), kBase + 0x900);
  EXPECT_EQ(cpu_->x(10), 1u) << "the addi did not run in U-mode";
}

TEST_F(CpuTest, InstretReadInTheMiddleOfARunCountsTheInstructionsBeforeIt) {
  cpu_->SetBootState(kBase, 0, 0, kMachine);
  cpu_->WriteCsrForTest(0xB02, 100);  // minstret
  // 5 x addi, csrr a0, minstret; csrr a1, mcycle (same counter here); jal 0
  Put(kBase, {Addi(5, 5, 1), Addi(5, 5, 1), Addi(5, 5, 1), Addi(5, 5, 1), Addi(5, 5, 1), Csrrs(10, 0xB02, 0),
              Csrrs(11, 0xB00, 0), Jal0()});
  auto r = cpu_->Run(20);
  EXPECT_EQ(r.instructions, 20u);
  EXPECT_EQ(cpu_->x(10), 105u);
  EXPECT_EQ(cpu_->x(11), 106u);
  EXPECT_EQ(cpu_->ReadCsrForTest(0xB02), 120u);
}

}  // namespace
}  // namespace ferry::riscv
