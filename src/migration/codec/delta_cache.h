// Source-side cache of the contents last sent for guest pages: the bases of XBZRLE deltas
// (xbzrle.h). When a page is re-sent, EncodeDelta() encodes it against the cached copy, which the
// destination holds as that page's contents as of the cached sequence number; after sending, the
// sender records the new contents with Insert().
//
// Capacity: capacity_bytes / 4096 slots, at most ram_pages (and at most 2^32 - 2). Capacity 0
// disables the cache: every call is a cheap no-op (EncodeDelta and Insert return false), nothing
// is allocated and nothing is counted. A gfn >= ram_pages is likewise a no-op (not counted).
// Memory: the slots (one anonymous mapping, touched as filled) and a gfn -> slot index (4 bytes per
// RAM page, mapped zero-filled) are allocated once at construction; no call allocates. If that
// allocation fails the cache logs a warning and runs disabled (stats().capacity_pages == 0).
//
// Replacement: an Insert for a gfn not cached takes a free slot of its shard or, only when the
// caller allows eviction, a victim chosen by CLOCK (second chance): an entry's reference bit is set
// when EncodeDelta finds it (hit or overflow) and when Insert overwrites it; new entries start
// unreferenced. The hand clears set bits as it passes and evicts the first clear one, so pages
// that keep being re-sent survive and a page that was only sent once goes first.
//
// Shards: `shards` rounded down to a power of two n (default 64, at most one per slot). Within
// every aligned block of n consecutive gfns each shard gets exactly one gfn (the low bits XOR a
// hash of the block number), so a contiguous range of pages spreads evenly and power-of-two
// strides do not pile onto one shard. Each shard owns a fixed range of slots (an equal share; when
// the cache covers all of RAM, exactly as many as it has gfns, so nothing is ever evicted) with its
// own free list, CLOCK hand and counters. The price of sharding: a shard evicts when full even if
// others have room, so a hot set skewed onto few shards gets less than the whole capacity.
//
// Threads: every method may be called from any thread. An entry only ever uses a slot of its gfn's
// shard, so each call locks exactly one shard mutex (stats() takes them in turn). Shard::{hand,
// free_count, counters} carry GUARDED_BY(mu) (clang checks them); the arrays are shared by all
// shards and guarded element-wise, which the analysis cannot express, so for them the rule is
// this comment:
//   index_[gfn]                               guarded by ShardOf(gfn).mu
//   meta_[s], the 4096 data bytes of slot s   guarded by the mutex of the shard owning slot s
//   free_[begin, begin + count) of a shard    guarded by that Shard::mu
// (Shard::{begin, count} and all other members are set in the constructor and then only read.)
// EncodeDelta runs the encoder under the shard lock (0.1-0.3 us per page), so an eviction
// by another thread cannot replace the base being read. The lock makes every call safe for any
// interleaving; the *meaning* of base_seq additionally needs what the migration engine guarantees:
// one gfn is handled by one thread at a time (encode, send, insert), so nothing else changes its
// entry between that thread's EncodeDelta and Insert.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/thread_annotations.h"

namespace ferry::migration {

class DeltaCache {
 public:
  static constexpr unsigned kDefaultShards = 64;

  DeltaCache(uint64_t capacity_bytes, uint64_t ram_pages, unsigned shards = kDefaultShards);
  ~DeltaCache();
  DeltaCache(const DeltaCache&) = delete;
  DeltaCache& operator=(const DeltaCache&) = delete;

  bool enabled() const { return slots_ != 0; }
  // From now on no delta is made and nothing is cached (post-copy: the destination dropped the
  // copies deltas would refer to, and a page sent now may be lost with a cut connection).
  void Freeze() { frozen_.store(true); }

  // If gfn is cached: XBZRLE-encodes `page` (kDeltaPageSize bytes, a stable copy) against the
  // cached contents into out[0, limit), sets *out_len (>= 1; see XbzrleEncode for an unchanged
  // page) and *base_seq (the seq the cached copy was sent with) and returns true. Returns false,
  // leaving *out_len and *base_seq alone, on a miss or when the delta would exceed `limit`
  // (counted as an encode overflow: the caller sends the page whole, then Inserts it).
  // *was_cached (if given) tells the two apart: true when gfn was cached (delta or overflow).
  bool EncodeDelta(uint64_t gfn, const uint8_t* page, uint8_t* out, size_t limit, size_t* out_len,
                   uint64_t* base_seq, bool* was_cached = nullptr);

  // Records that `page` (kDeltaPageSize bytes) was sent for gfn with sequence number seq. An
  // existing entry for gfn is overwritten (whatever may_evict says). Otherwise a slot is taken:
  // a free one of the gfn's shard, or, only if may_evict, one evicted by CLOCK. Returns whether the
  // page is now cached (false: disabled, gfn out of range, or the shard full and !may_evict).
  bool Insert(uint64_t gfn, const uint8_t* page, uint64_t seq, bool may_evict);

  // Forgets gfn (the destination's copy changed by other means: zero page, page sent without
  // caching). No-op if not cached.
  void Erase(uint64_t gfn);

  struct Stats {
    uint64_t capacity_pages = 0;    // slots
    uint64_t used_pages = 0;        // slots holding a page now
    uint64_t hits = 0;              // EncodeDelta calls that produced a delta
    uint64_t misses = 0;            // EncodeDelta calls for a gfn not cached
    uint64_t inserts = 0;           // Insert calls that stored the page (new entry or overwrite)
    uint64_t evictions = 0;         // entries replaced by CLOCK
    uint64_t encode_overflows = 0;  // EncodeDelta calls whose delta exceeded `limit`
    uint64_t refused = 0;           // Insert calls that found the shard full and could not evict
  };
  // A sum over the shards, each read under its lock (not one atomic snapshot of the whole cache).
  Stats stats() const;

 private:
  struct SlotMeta {
    uint64_t gfn;
    uint64_t seq;
    bool referenced;
  };
  struct alignas(64) Shard {
    mutable Mutex mu;
    uint32_t begin = 0;  // slots [begin, begin + count)
    uint32_t count = 0;
    uint32_t hand GUARDED_BY(mu) = 0;        // CLOCK position, relative to begin
    uint32_t free_count GUARDED_BY(mu) = 0;  // free slots: a stack in free_[begin, begin + free_count)
    uint64_t hits GUARDED_BY(mu) = 0, misses GUARDED_BY(mu) = 0, inserts GUARDED_BY(mu) = 0,
        evictions GUARDED_BY(mu) = 0, encode_overflows GUARDED_BY(mu) = 0, refused GUARDED_BY(mu) = 0;
  };

  unsigned ShardIndex(uint64_t gfn) const;
  Shard& ShardOf(uint64_t gfn) const { return shards_[ShardIndex(gfn)]; }
  uint8_t* Data(uint32_t slot) const { return data_ + uint64_t{slot} * kSlotBytes; }
  uint32_t ClockVictim(Shard& sh) REQUIRES(sh.mu);  // and no free slot

  static constexpr uint64_t kSlotBytes = 4096;

  uint64_t ram_pages_ = 0;
  uint32_t slots_ = 0;      // 0: disabled
  unsigned num_shards_ = 0;  // a power of two
  unsigned shard_bits_ = 0;  // log2(num_shards_)
  std::atomic<bool> frozen_{false};
  uint8_t* data_ = nullptr;     // slots_ * 4096 bytes (mmap)
  uint32_t* index_ = nullptr;   // ram_pages_ entries: slot + 1, 0 = not cached (mmap)
  size_t data_map_bytes_ = 0, index_map_bytes_ = 0;
  std::unique_ptr<SlotMeta[]> meta_;   // slots_ entries
  std::unique_ptr<uint32_t[]> free_;   // slots_ entries: the shards' free stacks
  std::unique_ptr<Shard[]> shards_;    // num_shards_ entries
};

}  // namespace ferry::migration
