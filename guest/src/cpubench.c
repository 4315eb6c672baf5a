/* cpubench[:secs=S][,every_ms=MS][,nice=N] — integer CPU benchmark (hash + insertion sort + arithmetic).
 * Without every_ms: runs S s (default 10), then prints one score. With every_ms: runs forever and prints the score
 * of each interval of MS ms ("cpubench score=N units/s seq=K"; secs is ignored), so a host can follow the guest's
 * speed over time. nice=N (default 0) sets the process's nice level first. */
#include <sys/resource.h>

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

static volatile uint64_t sink; /* keeps the work observable in the interval mode */

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  long long secs = opt_int(a, "secs", 10), every_ms = opt_int(a, "every_ms", 0), nice_level = opt_int(a, "nice", 0);
  if (secs <= 0) secs = 10;
  if (every_ms < 0 || nice_level < -20 || nice_level > 19) {
    say("cpubench: bad arguments '%s'", a);
    return 2;
  }
  if (nice_level) setpriority(PRIO_PROCESS, 0, (int)nice_level);
  uint64_t n = 0, acc = 0;
  double start = now_s(), t = start;
  if (every_ms > 0) {
    const double every = (double)every_ms / 1000.0;
    uint64_t n0 = 0;
    for (unsigned long long seq = 0;; seq++) {
      while (t - start < every) {
        for (int k = 0; k < 100; k++) acc += unit(n++);
        t = now_s();
      }
      sink = acc;
      say("cpubench score=%.0f units/s seq=%llu", (double)(n - n0) / (t - start), seq);
      n0 = n;
      start = t;
    }
  }
  while (t - start < (double)secs) {
    for (int k = 0; k < 100; k++) acc += unit(n++);
    t = now_s();
  }
  say("cpubench score=%.0f units/s (check %llx)", (double)n / (t - start), (unsigned long long)(acc & 0xffff));
  return 0;
}
