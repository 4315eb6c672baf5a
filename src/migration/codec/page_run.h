// A run of consecutive guest pages to send, as the engine's scheduler hands them to the codec
// stage: what the pages are known to be (read them, known zero, reported free), whether they
// were sent before, and whether they are likely to be sent again. Plain data.
#pragma once

#include <cstdint>

namespace ferry::migration {

enum class RunKind : uint8_t { kScan, kZero, kFree };

struct PageRun {
  uint64_t gfn = 0;
  uint32_t count = 0;
  RunKind kind = RunKind::kScan;
  bool resend = false;  // the pages were sent before
  bool warm = false;    // written in recent dirty-log samples: likely to be sent again
};

}  // namespace ferry::migration
