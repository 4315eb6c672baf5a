// Test helper: reads one sample out of Prometheus text exposition (GET /metrics of ferry-vmm and
// ferry-gateway), so a test checks a metric's value - and fails when the metric is missing -
// instead of searching for (or for the absence of) a line. Header-only, no dependencies.
#pragma once

#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>

namespace ferry::test {

// The value of the unlabelled sample `name` ("name VALUE" on a line of its own); nullopt when the
// metric is absent or its value does not parse.
inline std::optional<double> MetricValue(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.size() <= name.size() + 1 || line.compare(0, name.size(), name) != 0 || line[name.size()] != ' ') continue;
    const std::string value = line.substr(name.size() + 1);
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    if (end == value.c_str() || *end != '\0') return std::nullopt;
    return v;
  }
  return std::nullopt;
}

}  // namespace ferry::test
