// PostcopyRam on real memfd RAM with userfaultfd: a thread touching a missing page waits for it,
// a request goes out once, the page lands atomically; pages that are not missing resolve as
// zero locally; the guest's own pages are never overwritten.
#include "migration/engine/postcopy_ram.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "common/thread_annotations.h"
#include "memory/guest_memory.h"

namespace ferry::migration {
namespace {

constexpr uint64_t kPages = 64;

struct Fixture {
  std::unique_ptr<GuestMemory> mem = std::move(*GuestMemory::Create(0x80000000, kPages * 4096));
  RamView ram{mem->host(), mem->size(), nullptr, mem->memfd(), {}};
  Mutex mu;
  std::vector<uint64_t> requests GUARDED_BY(mu);
  PostcopyRam::RequestFn request = [this](uint64_t gfn, uint32_t) {
    MutexLock l(mu);
    requests.push_back(gfn);
    return Status{};
  };
  size_t requests_size() EXCLUDES(mu) {
    MutexLock l(mu);
    return requests.size();
  }
  uint64_t requested(size_t i) EXCLUDES(mu) {
    MutexLock l(mu);
    return requests.at(i);
  }
};

PostcopyStart Missing(std::initializer_list<uint64_t> pages) {
  PostcopyStart m{kPages, 0, std::vector<uint64_t>((kPages + 63) / 64, 0)};
  for (uint64_t p : pages) {
    m.missing[p / 64] |= 1ull << (p % 64);
    ++m.missing_pages;
  }
  return m;
}

TEST(PostcopyRam, AccessToMissingPageWaitsForItAndRequestsOnce) {
  if (!PostcopyRam::Available()) GTEST_SKIP() << "userfaultfd is not available to this user";
  Fixture f;
  std::memset(f.mem->host() + 3 * 4096, 0x11, 4096);  // a stale copy the source will replace
  std::memset(f.mem->host() + 5 * 4096, 0x22, 4096);  // current: not missing
  auto pc = PostcopyRam::Start(f.ram, Missing({3, 9}), f.request);
  ASSERT_TRUE(pc) << pc.error().message();
  // Not missing: untouched, and a never-written page reads as zero without a request.
  EXPECT_EQ(f.mem->host()[5 * 4096], 0x22);
  EXPECT_EQ(f.mem->host()[20 * 4096 + 7], 0);
  std::atomic<int> seen{-1};
  std::thread reader([&] { seen = f.mem->host()[3 * 4096 + 100]; });  // blocks in the fault
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(seen.load(), -1) << "read a missing page before it arrived";
  ASSERT_EQ(f.requests_size(), 1u);
  EXPECT_EQ(f.requested(0), 3u);
  std::vector<uint8_t> page(4096, 0x33);
  ASSERT_TRUE((*pc)->WritePage(3, page));
  reader.join();
  EXPECT_EQ(seen.load(), 0x33);
  // A second copy is dropped, never written over what the guest may have changed since.
  f.mem->host()[3 * 4096] = 0x44;
  std::vector<uint8_t> again(4096, 0x55);
  ASSERT_TRUE((*pc)->WritePage(3, again));
  EXPECT_EQ(f.mem->host()[3 * 4096], 0x44);
  EXPECT_EQ((*pc)->Stats().duplicate_pages, 1u);
  // A page that was never missing is the guest's: refused.
  EXPECT_FALSE((*pc)->WritePage(5, page));
  EXPECT_FALSE((*pc)->ApplyDelta(9, page));
  EXPECT_FALSE((*pc)->Finish()) << "page 9 is still missing";
  ASSERT_TRUE((*pc)->ZeroPage(9));
  EXPECT_TRUE((*pc)->complete());
  ASSERT_TRUE((*pc)->Finish());
  EXPECT_EQ(f.mem->host()[9 * 4096], 0);
  const PostcopyDone st = (*pc)->Stats();
  EXPECT_EQ(st.demand_faults, 1u);
  EXPECT_GE(st.local_faults, 1u);
  EXPECT_GE(st.p50_us, 50'000u) << "the reader waited ~100 ms";
}

TEST(PostcopyRam, KernelAccessWaitsToo) {
  if (!PostcopyRam::Available()) GTEST_SKIP() << "userfaultfd is not available to this user";
  Fixture f;
  auto pc = PostcopyRam::Start(f.ram, Missing({7}), f.request);
  ASSERT_TRUE(pc) << pc.error().message();
  // A read(2) into the missing page (as a device backend reading from a TAP into guest RAM).
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(write(fds[1], "hello", 5), 5);
  std::atomic<ssize_t> got{-2};
  std::thread reader([&] { got = read(fds[0], f.mem->host() + 7 * 4096 + 10, 5); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(got.load(), -2);
  std::vector<uint8_t> page(4096, 'x');
  ASSERT_TRUE((*pc)->WritePage(7, page));
  reader.join();
  EXPECT_EQ(got.load(), 5);
  EXPECT_EQ(std::memcmp(f.mem->host() + 7 * 4096 + 10, "hello", 5), 0);
  EXPECT_EQ(f.mem->host()[7 * 4096], 'x');
  close(fds[0]);
  close(fds[1]);
  ASSERT_TRUE((*pc)->Finish());
}

}  // namespace
}  // namespace ferry::migration
