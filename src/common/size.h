// Byte sizes as operators write them: "4096", "64k", "256M", "1G", "512MiB" (K/M/G and KiB/MiB/GiB
// are powers of 1024; "B" or no suffix = bytes). Used by every command line and API body.
#pragma once

#include <cstdint>
#include <string_view>

#include "common/error.h"

namespace ferry {

Result<uint64_t> ParseSize(std::string_view s);

}  // namespace ferry
