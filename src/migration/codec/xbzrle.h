// XBZRLE page delta: a re-sent 4096-byte page encoded as its changes against the contents the
// receiver already holds (the idea of QEMU's XBZRLE; our own format and code).
//
// Format (version 1; docs/protocol.md copies this):
//   delta   := pair*                       (possibly empty)
//   pair    := uleb128 unchanged_len, uleb128 changed_len, changed_len bytes
// Applied left to right from page offset 0: keep `unchanged_len` bytes, then overwrite the next
// `changed_len` bytes with the bytes given. Bytes after the last pair keep their value (the final
// unchanged run is implicit). The empty delta is valid and means "unchanged" (the encoder below
// never produces it; a protocol may forbid it).
// Lengths: ULEB128 (7 bits per byte, least significant group first, bit 7 set = another byte
// follows), canonical (a multi-byte form never ends in a 0x00 byte), at most 2 bytes, value <= 4096.
// A decoder rejects, with kCorrupt, anything but that; each form has its own message:
//   - input ending inside a length or where a length is due ("truncated length"),
//   - a third length byte ("longer than 2 bytes"), a non-canonical length ("non-canonical"),
//   - a length above 4096 ("exceeds the page size"),
//   - changed_len == 0 ("empty changed run"),
//   - unchanged_len == 0 in any pair but the first ("empty unchanged run": adjacent changed runs are
//     one run, as in QEMU), which also makes every valid delta's pair count <= 2048,
//   - a run ending beyond offset 4096 ("runs past the page end"),
//   - fewer changed bytes than changed_len ("changed bytes truncated"),
//   - any byte after a pair that completes the page at offset 4096 ("trailing bytes").
// Hence a valid delta is at most kXbzrleMaxDeltaSize = 6145 bytes (a pair costs >= 2 length bytes +
// changed_len and advances >= changed_len + 1 page bytes except the first: (0,1) then 2047 x (1,1)
// with the last run 2 bytes long); receivers may bound delta entries by it before decoding.
// Senders compare the delta with the 4096-byte raw page and send the smaller (`limit` below).
//
// The encoder is one valid choice among several (the decoder accepts any valid delta): it merges
// two changed runs separated by fewer than kXbzrleMinGap unchanged bytes (a split would cost at
// least two length bytes), and ends the last changed run at the last differing byte.
//
// Pure functions, no allocation, thread-safe. Pages are plain memory: callers pass stable copies
// (a page the guest writes during encoding yields a delta of some mix of its old and new bytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/error.h"

namespace ferry::migration {

inline constexpr size_t kDeltaPageSize = 4096;
inline constexpr size_t kXbzrleMaxDeltaSize = 6145;
// Encoder policy: unchanged gaps shorter than this are sent as changed bytes.
inline constexpr size_t kXbzrleMinGap = 3;

// Encodes new_page against old_page (kDeltaPageSize bytes each) into out[0, limit) and returns
// the delta's length, >= 1; or 0 when it would need more than `limit` bytes (the caller then sends
// the full page). Equal pages give the 3-byte no-op delta {0x00, 0x01, new_page[0]} ("rewrite
// byte 0 with its value"), so a delta is never empty (callers that would rather skip an
// unchanged page compare the pages themselves). Never writes at or beyond out + limit; bytes of
// out past the returned length are unspecified. Stops as soon as the output cannot fit, so a
// rewritten page costs about `limit` bytes of comparison.
size_t XbzrleEncode(const uint8_t* old_page, const uint8_t* new_page, uint8_t* out, size_t limit);

// Applies `delta` to `page` (kDeltaPageSize bytes, in/out). All-or-nothing: the whole delta is
// validated before the first byte is written, so on error the page is unchanged. Errors: kCorrupt,
// the forms listed above, each naming the delta offset.
Status XbzrleDecode(std::span<const uint8_t> delta, uint8_t* page);

}  // namespace ferry::migration
