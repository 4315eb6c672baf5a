// Post-copy records: round trips and one reject per malformed form.
#include "migration/protocol/postcopy.h"

#include <gtest/gtest.h>

#include "common/state_io.h"

namespace ferry::migration {
namespace {

TEST(PostcopyRecords, StartRoundTrip) {
  PostcopyStart m{130, 3, {0b101, 1ull << 1, 0}};
  auto d = DecodePostcopyStart(Encode(m), 130);
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->missing_pages, 3u);
  EXPECT_EQ(d->missing, m.missing);
}

TEST(PostcopyRecords, StartRejects) {
  // RAM size differs.
  EXPECT_FALSE(DecodePostcopyStart(Encode(PostcopyStart{128, 0, {0, 0}}), 130));
  // Bitmap too short / too long.
  EXPECT_FALSE(DecodePostcopyStart(Encode(PostcopyStart{130, 0, {0, 0}}), 130));
  EXPECT_FALSE(DecodePostcopyStart(Encode(PostcopyStart{130, 0, {0, 0, 0, 0}}), 130));
  // A bit past the last page.
  EXPECT_FALSE(DecodePostcopyStart(Encode(PostcopyStart{130, 1, {0, 0, 1ull << 2}}), 130));
  // Count does not match the bits.
  EXPECT_FALSE(DecodePostcopyStart(Encode(PostcopyStart{130, 2, {1, 0, 0}}), 130));
  // Truncated header.
  EXPECT_FALSE(DecodePostcopyStart(std::vector<uint8_t>(7, 0), 130));
}

TEST(PostcopyRecords, PageRequestRoundTripAndRejects) {
  auto d = DecodePageRequest(Encode(PageRequest{99, 1}), 100);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->gfn, 99u);
  EXPECT_FALSE(DecodePageRequest(Encode(PageRequest{100, 1}), 100));             // outside RAM
  EXPECT_FALSE(DecodePageRequest(Encode(PageRequest{99, 2}), 100));              // runs past the end
  EXPECT_FALSE(DecodePageRequest(Encode(PageRequest{0, 0}), 100));               // empty
  EXPECT_FALSE(DecodePageRequest(Encode(PageRequest{0, kMaxRequestPages + 1}), 1000));  // too many
  auto extra = Encode(PageRequest{1, 1});
  extra.push_back(0);
  EXPECT_FALSE(DecodePageRequest(extra, 100));  // trailing bytes
  EXPECT_FALSE(DecodePageRequest(std::vector<uint8_t>(11, 0), 100));  // short
}

TEST(PostcopyRecords, DoneRoundTripAndRejects) {
  PostcopyDone m{5, 7, 100, 900, 1200, 2};
  auto d = DecodePostcopyDone(Encode(m));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->demand_faults, 5u);
  EXPECT_EQ(d->p99_us, 900u);
  EXPECT_FALSE(DecodePostcopyDone(Encode(PostcopyDone{1, 0, 900, 100, 1200, 0})));  // percentiles out of order
  auto shortp = Encode(m);
  shortp.pop_back();
  EXPECT_FALSE(DecodePostcopyDone(shortp));
}

}  // namespace
}  // namespace ferry::migration
