/* cpubench[:secs=S] — integer CPU benchmark (hash + insertion sort + arithmetic); prints a score. */
#include "common.h"

static uint64_t unit(uint64_t x) {
  uint32_t a[64];
  uint64_t s = x;
  for (int i = 0; i < 64; i++) a[i] = (uint32_t)splitmix64(&s);
  for (int i = 1; i < 64; i++) {
    uint32_t v = a[i];
    int j = i - 1;
    while (j >= 0 && a[j] > v) { a[j + 1] = a[j]; j--; }
    a[j + 1] = v;
  }
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < 64; i++) h = (h ^ a[i]) * 1099511628211ull + (uint64_t)i / 3;
  return h;
}

int main(int argc, char **argv) {
  long long secs = opt_int(argc > 1 ? argv[1] : "", "secs", 10);
  if (secs <= 0) secs = 10;
  uint64_t n = 0, acc = 0;
  double start = now_s(), t = start;
  while (t - start < (double)secs) {
    for (int k = 0; k < 100; k++) acc += unit(n++);
    t = now_s();
  }
  say("cpubench score=%.0f units/s (check %llx)", (double)n / (t - start), (unsigned long long)(acc & 0xffff));
  return 0;
}
