#include "migration/codec/delta_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <new>

#include <spdlog/spdlog.h>

#include "migration/codec/xbzrle.h"

namespace ferry::migration {
namespace {

constexpr uint64_t kMaxSlots = UINT32_MAX - 1;  // index entries hold slot + 1 in a uint32

void* MapAnonymous(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

static_assert(kDeltaPageSize == 4096);

DeltaCache::DeltaCache(uint64_t capacity_bytes, uint64_t ram_pages, unsigned shards) : ram_pages_(ram_pages) {
  const uint64_t slots = std::min({capacity_bytes / kSlotBytes, ram_pages, kMaxSlots});
  if (slots == 0) return;
  unsigned bits = 0;
  while ((uint64_t{2} << bits) <= std::min<uint64_t>(std::max(shards, 1u), slots)) ++bits;
  const unsigned n_shards = 1u << bits;
  const size_t data_bytes = slots * kSlotBytes;
  const size_t index_bytes = ram_pages * sizeof(uint32_t);
  data_ = static_cast<uint8_t*>(MapAnonymous(data_bytes));
  index_ = static_cast<uint32_t*>(MapAnonymous(index_bytes));  // zero-filled: nothing cached
  meta_.reset(new (std::nothrow) SlotMeta[slots]);
  free_.reset(new (std::nothrow) uint32_t[slots]);
  shards_.reset(new (std::nothrow) Shard[n_shards]);
  if (!data_ || !index_ || !meta_ || !free_ || !shards_) {
    spdlog::warn("delta cache: cannot allocate {} MiB for {} pages (+ {} MiB index); running without it",
                 data_bytes >> 20, slots, index_bytes >> 20);
    if (data_) munmap(data_, data_bytes);
    if (index_) munmap(index_, index_bytes);
    data_ = nullptr;
    index_ = nullptr;
    meta_.reset();
    free_.reset();
    shards_.reset();
    return;
  }
  data_map_bytes_ = data_bytes;
  index_map_bytes_ = index_bytes;
  slots_ = static_cast<uint32_t>(slots);
  num_shards_ = n_shards;
  shard_bits_ = bits;
  // Slots per shard: an equal share; when every page fits, exactly the shard's number of gfns (every
  // aligned block of n_shards gfns has one per shard; only the last, partial block needs counting).
  for (unsigned s = 0; s < n_shards; ++s)
    shards_[s].count = static_cast<uint32_t>(slots / n_shards + (s < slots % n_shards ? 1 : 0));
  if (slots == ram_pages) {
    for (unsigned s = 0; s < n_shards; ++s) shards_[s].count = static_cast<uint32_t>(ram_pages / n_shards);
    for (uint64_t g = ram_pages - ram_pages % n_shards; g < ram_pages; ++g) shards_[ShardIndex(g)].count++;
  }
  uint32_t begin = 0;
  for (unsigned s = 0; s < n_shards; ++s) {
    Shard& sh = shards_[s];
    sh.begin = begin;
    sh.free_count = sh.count;
    // Pop order = ascending slot numbers (the stack's top is its last element).
    for (uint32_t i = 0; i < sh.count; ++i) free_[begin + i] = begin + sh.count - 1 - i;
    begin += sh.count;
  }
  for (uint32_t i = 0; i < slots_; ++i) meta_[i] = SlotMeta{0, 0, false};
}

DeltaCache::~DeltaCache() {
  if (data_) munmap(data_, data_map_bytes_);
  if (index_) munmap(index_, index_map_bytes_);
}

unsigned DeltaCache::ShardIndex(uint64_t gfn) const {
  if (shard_bits_ == 0) return 0;
  // The gfn's low bits XOR the top bits of a multiplicative hash of its block number: a bijection
  // inside every aligned block of num_shards_ gfns, a different one for every block.
  const uint64_t block_hash = (gfn >> shard_bits_) * 0x9e3779b97f4a7c15ull;
  return static_cast<unsigned>((gfn ^ (block_hash >> (64 - shard_bits_))) & (num_shards_ - 1));
}

uint32_t DeltaCache::ClockVictim(Shard& sh) {
  // Every slot of the shard is in use. Ends within two sweeps: the first clears each bit it passes.
  for (;;) {
    const uint32_t slot = sh.begin + sh.hand;
    sh.hand = sh.hand + 1 == sh.count ? 0 : sh.hand + 1;
    if (!meta_[slot].referenced) return slot;
    meta_[slot].referenced = false;
  }
}

bool DeltaCache::EncodeDelta(uint64_t gfn, const uint8_t* page, uint8_t* out, size_t limit, size_t* out_len,
                             uint64_t* base_seq, bool* was_cached) {
  if (frozen_.load(std::memory_order_relaxed)) {
    if (was_cached) *was_cached = false;
    return false;
  }
  if (was_cached) *was_cached = false;
  if (slots_ == 0 || gfn >= ram_pages_) return false;
  Shard& sh = ShardOf(gfn);
  MutexLock lk(sh.mu);
  const uint32_t e = index_[gfn];
  if (e == 0) {
    sh.misses++;
    return false;
  }
  if (was_cached) *was_cached = true;
  SlotMeta& m = meta_[e - 1];
  m.referenced = true;
  const size_t n = XbzrleEncode(Data(e - 1), page, out, limit);
  if (n == 0) {
    sh.encode_overflows++;
    return false;
  }
  sh.hits++;
  *out_len = n;
  *base_seq = m.seq;
  return true;
}

bool DeltaCache::Insert(uint64_t gfn, const uint8_t* page, uint64_t seq, bool may_evict) {
  if (frozen_.load(std::memory_order_relaxed)) return false;
  if (slots_ == 0 || gfn >= ram_pages_) return false;
  Shard& sh = ShardOf(gfn);
  MutexLock lk(sh.mu);
  uint32_t slot;
  if (const uint32_t e = index_[gfn]; e != 0) {
    slot = e - 1;
    meta_[slot].seq = seq;
    meta_[slot].referenced = true;
  } else {
    if (sh.free_count > 0) {
      slot = free_[sh.begin + --sh.free_count];
    } else if (may_evict) {
      slot = ClockVictim(sh);
      index_[meta_[slot].gfn] = 0;
      sh.evictions++;
    } else {
      sh.refused++;
      return false;
    }
    meta_[slot] = SlotMeta{gfn, seq, false};
    index_[gfn] = slot + 1;
  }
  std::memcpy(Data(slot), page, kSlotBytes);
  sh.inserts++;
  return true;
}

void DeltaCache::Erase(uint64_t gfn) {
  if (slots_ == 0 || gfn >= ram_pages_) return;
  Shard& sh = ShardOf(gfn);
  MutexLock lk(sh.mu);
  const uint32_t e = index_[gfn];
  if (e == 0) return;
  index_[gfn] = 0;
  meta_[e - 1].referenced = false;
  free_[sh.begin + sh.free_count++] = e - 1;
}

DeltaCache::Stats DeltaCache::stats() const {
  Stats st;
  st.capacity_pages = slots_;
  for (unsigned s = 0; s < num_shards_; ++s) {
    const Shard& sh = shards_[s];
    MutexLock lk(sh.mu);
    st.used_pages += sh.count - sh.free_count;
    st.hits += sh.hits;
    st.misses += sh.misses;
    st.inserts += sh.inserts;
    st.evictions += sh.evictions;
    st.encode_overflows += sh.encode_overflows;
    st.refused += sh.refused;
  }
  return st;
}

}  // namespace ferry::migration
