// Text that came from outside (a migration peer's ERROR or CANCEL text, a request path) made safe to
// log and to put into JSON: valid UTF-8 stays, every byte that is not part of a valid UTF-8
// sequence becomes U+FFFD, control characters other than tab become U+FFFD as well (no terminal
// escapes in logs). Pure functions, any thread.
#pragma once

#include <string>
#include <string_view>

namespace ferry {

// `s` as printable UTF-8 (see above), cut to at most `max_bytes` bytes at a character boundary.
std::string PrintableText(std::string_view s, size_t max_bytes = 4096);

}  // namespace ferry
