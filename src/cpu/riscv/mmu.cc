// Address translation (Sv39/Sv48, hardware A/D update), physical access (RAM or MMIO),
// the slow paths of loads/stores/fetches, and the dirty-log harvest handshake.
#include <cstring>
#include <thread>

#include "cpu/riscv/mem_inline.h"

namespace ferry::riscv {

namespace {
constexpr uint64_t kPteV = 1, kPteR = 2, kPteW = 4, kPteX = 8, kPteU = 16, kPteA = 64, kPteD = 128;
}

void RiscvCpu::FillTlb(TlbEntry* tlb, uint64_t va, uint64_t pa, int priv) {
  if (pa < ram_base_ || pa - ram_base_ >= ram_size_) return;  // MMIO is never cached
  const uint64_t vpn = va >> 12;
  TlbEntry& e = tlb[vpn & (kTlbSize - 1)];
  e.tag = (vpn << 2) | static_cast<uint64_t>(priv);
  e.addend = reinterpret_cast<uintptr_t>(ram_host_ + ((pa & ~0xfffull) - ram_base_)) - (va & ~0xfffull);
}

void RiscvCpu::FlushTlb() {
  for (int i = 0; i < kTlbSize; ++i) tlb_read_[i].tag = tlb_write_[i].tag = tlb_code_[i].tag = code_tlb_[i].tag = ~0ull;
}

void RiscvCpu::FlushWriteTlb() {
  for (int i = 0; i < kTlbSize; ++i) tlb_write_[i].tag = ~0ull;
}

bool RiscvCpu::PhysRead(uint64_t pa, unsigned size, uint64_t* v, Access acc) {
  if (pa >= ram_base_ && pa - ram_base_ <= ram_size_ - size) {
    *v = 0;
    std::memcpy(v, ram_host_ + (pa - ram_base_), size);
    return true;
  }
  if (acc == Access::kFetch) return false;  // no execution from MMIO
  counters_.mmio_accesses++;
  const bool ok = env_.bus && env_.bus->Read(pa, size, v);
  CheckDeviceCodeWrites();  // the device may have written guest RAM (DMA) synchronously
  return ok;
}

bool RiscvCpu::PhysWrite(uint64_t pa, unsigned size, uint64_t v) {
  if (pa >= ram_base_ && pa - ram_base_ <= ram_size_ - size) {
    uint64_t off = pa - ram_base_;
    std::memcpy(ram_host_ + off, &v, size);
    // Mark after the data store (see guest_memory.h); count pages that were not marked yet
    // (the activity signal).
    MarkWritten(off >> 12);
    if (((off + size - 1) >> 12) != (off >> 12)) MarkWritten((off + size - 1) >> 12);
    // Self-modifying code: drop decoded instructions of the written page(s). Pages with
    // decoded code never have write-TLB entries, so every such store comes through here.
    if (__builtin_expect(code_watch_[off >> 12] != 0, 0)) InvalidateCodePage(off >> 12);
    if (__builtin_expect(code_watch_[(off + size - 1) >> 12] != 0, 0)) InvalidateCodePage((off + size - 1) >> 12);
    if (pa == reservation_) reservation_ = ~0ull;
    return true;
  }
  counters_.mmio_accesses++;
  const bool ok = env_.bus && env_.bus->Write(pa, size, v);
  CheckDeviceCodeWrites();  // e.g. a virtio notify completed a request into guest RAM
  return ok;
}

bool RiscvCpu::Translate(uint64_t va, Access acc, uint64_t* pa, bool raise) {
  const int p = EffectivePriv(acc);
  const uint64_t mode = satp_ >> 60;
  const uint64_t page_fault = acc == Access::kFetch ? kCauseFetchPage : acc == Access::kRead ? kCauseLoadPage : kCauseStorePage;
  const uint64_t access_fault = acc == Access::kFetch ? kCauseFetchAccess : acc == Access::kRead ? kCauseLoadAccess : kCauseStoreAccess;
  if (p == kMachine || mode == 0) {
    *pa = va;
    return true;
  }
  const int levels = mode == 9 ? 4 : 3;
  const int va_bits = 12 + 9 * levels;
  // Canonical check: bits above va_bits-1 must equal bit va_bits-1.
  int64_t sva = static_cast<int64_t>(va << (64 - va_bits)) >> (64 - va_bits);
  if (static_cast<uint64_t>(sva) != va) {
    if (raise) RaiseException(page_fault, va);
    return false;
  }
  counters_.tlb_misses++;
  uint64_t a = (satp_ & ((1ull << 44) - 1)) << 12;
  for (int i = levels - 1; i >= 0; --i) {
    uint64_t pte_addr = a + ((va >> (12 + 9 * i)) & 0x1ff) * 8;
    uint64_t pte;
    if (!PhysRead(pte_addr, 8, &pte, Access::kRead)) {
      if (raise) RaiseException(access_fault, va);
      return false;
    }
    if (!(pte & kPteV) || (!(pte & kPteR) && (pte & kPteW)) || (pte >> 54) != 0) break;
    if (!(pte & (kPteR | kPteX))) {  // pointer to next level
      if (i == 0) break;
      if (pte & (kPteA | kPteD | kPteU)) break;  // non-leaf must have A/D/U clear
      a = ((pte >> 10) & ((1ull << 44) - 1)) << 12;
      continue;
    }
    // Leaf: permission checks.
    bool ok;
    if (acc == Access::kFetch) ok = pte & kPteX;
    else if (acc == Access::kRead) ok = (pte & kPteR) || ((mstatus_ & kMstatusMXR) && (pte & kPteX));
    else ok = pte & kPteW;
    if (p == kUser && !(pte & kPteU)) ok = false;
    if (p == kSupervisor && (pte & kPteU) && (acc == Access::kFetch || !(mstatus_ & kMstatusSUM))) ok = false;
    uint64_t ppn = (pte >> 10) & ((1ull << 44) - 1);
    if (i > 0 && (ppn & ((1ull << (9 * i)) - 1))) ok = false;  // misaligned superpage
    if (!ok) break;
    uint64_t need = kPteA | (acc == Access::kWrite ? kPteD : 0);
    if ((pte & need) != need) {
      pte |= need;
      if (!PhysWrite(pte_addr, 8, pte)) {
        if (raise) RaiseException(access_fault, va);
        return false;
      }
    }
    uint64_t mask = (1ull << (12 + 9 * i)) - 1;
    *pa = ((ppn << 12) & ~mask) | (va & mask);
    return true;
  }
  if (raise) RaiseException(page_fault, va);
  return false;
}

bool RiscvCpu::LoadSlow(uint64_t va, unsigned size, uint64_t* out) {
  if ((va & 0xfff) + size > 0x1000) {  // misaligned access crossing a page: byte by byte
    uint64_t v = 0;
    for (unsigned i = 0; i < size; ++i) {
      uint64_t b;
      if (!LoadSlow(va + i, 1, &b)) return false;
      v |= b << (8 * i);
    }
    *out = v;
    return true;
  }
  uint64_t pa;
  if (!Translate(va, Access::kRead, &pa)) return false;
  if (!PhysRead(pa, size, out, Access::kRead)) {
    RaiseException(kCauseLoadAccess, va);
    return false;
  }
  FillTlb(tlb_read_, va, pa, EffectivePriv(Access::kRead));
  // Sign/zero extension is done by the caller via the template type.
  return true;
}

bool RiscvCpu::StoreSlow(uint64_t va, unsigned size, uint64_t v) {
  if ((va & 0xfff) + size > 0x1000) {
    // Translate every byte first so a fault leaves memory untouched.
    uint64_t pas[8];
    for (unsigned i = 0; i < size; ++i)
      if (!Translate(va + i, Access::kWrite, &pas[i])) return false;
    for (unsigned i = 0; i < size; ++i)
      if (!PhysWrite(pas[i], 1, (v >> (8 * i)) & 0xff)) {
        RaiseException(kCauseStoreAccess, va);
        return false;
      }
    return true;
  }
  uint64_t pa;
  if (!Translate(va, Access::kWrite, &pa)) return false;
  if (!PhysWrite(pa, size, v)) {
    RaiseException(kCauseStoreAccess, va);
    return false;
  }
  // The page is marked dirty (PhysWrite); until the next harvest, writes may skip marking.
  FillTlb(tlb_write_, va, pa, EffectivePriv(Access::kWrite));
  return true;
}

bool RiscvCpu::FetchSlow(uint64_t pc, uint32_t* insn, int* len) {
  auto fetch16 = [&](uint64_t va, uint16_t* out) -> bool {
    uint64_t pa;
    if (!Translate(va, Access::kFetch, &pa)) return false;
    uint64_t v;
    if (!PhysRead(pa, 2, &v, Access::kFetch)) {
      RaiseException(kCauseFetchAccess, va);
      return false;
    }
    *out = static_cast<uint16_t>(v);
    FillTlb(tlb_code_, va, pa, priv_);
    return true;
  };
  uint16_t lo;
  if (!fetch16(pc, &lo)) return false;
  if ((lo & 3) != 3) {
    *insn = lo;
    *len = 2;
    return true;
  }
  uint16_t hi;
  if (!fetch16(pc + 2, &hi)) {
    // A fault on the second half reports the address of that half.
    return false;
  }
  *insn = lo | (static_cast<uint32_t>(hi) << 16);
  *len = 4;
  return true;
}

// --- dirty-log harvest handshake (see src/memory/guest_memory.h) ---

void RiscvCpu::OnDirtyLogHarvest() {
  std::unique_lock<std::mutex> lock(harvest_mu_);
  if (!in_run_) {
    FlushWriteTlb();  // Run() is not executing and cannot start while we hold the mutex
    return;
  }
  if (run_thread_ == std::this_thread::get_id()) {
    // Called from inside our own Run(): a device handler reached through an MMIO access or
    // an SBI call, e.g. the balloon processing a free page report (DirtyLog::MarkFreed) on
    // the store to its notify register. Waiting for Run() to service a request would
    // deadlock (Run() is this thread), so flush right here. That is safe because the TLBs
    // are only ever touched by this thread and nothing holds a TLB entry across a bus
    // access: every fast-path store looks its entry up afresh (Store(), the decoded
    // STOREs), and StoreSlow's FillTlb after the access is a no-op for MMIO. The very next
    // store -- even later in the same straight-line block -- therefore takes the slow path
    // and stores 1. (Only requesting the flush, harvest_pending_ + attention_, would leave
    // the rest of the block, up to the next taken jump or page end, running on the stale
    // write entries: harmless for free page reporting, since the guest cannot reuse a
    // reported page before its driver has processed the used ring, many taken jumps later,
    // but needlessly dependent on that.) A request pending from another thread is left to
    // Run()'s loop as usual.
    FlushWriteTlb();
    return;
  }
  uint64_t ticket = ++harvest_requested_;
  harvest_pending_.store(true, std::memory_order_release);
  attention_.store(true, std::memory_order_release);
  harvest_cv_.wait(lock, [&] { return harvest_done_ >= ticket || !in_run_; });
  if (harvest_done_ < ticket) FlushWriteTlb();  // Run() returned before servicing
}

void RiscvCpu::ServiceHarvestRequest() {
  std::lock_guard<std::mutex> lock(harvest_mu_);
  FlushWriteTlb();
  harvest_done_ = harvest_requested_;
  harvest_pending_.store(false, std::memory_order_relaxed);
  harvest_cv_.notify_all();
}

}  // namespace ferry::riscv
