/* membw:mib=N,secs=S — sequential memory write bandwidth (measures dirty-tracking overhead). */
#include <stdlib.h>
#include <sys/mman.h>

#include "common.h"

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  long long mib = opt_int(a, "mib", 64), secs = opt_int(a, "secs", 5);
  if (mib <= 0 || secs <= 0) { say("membw: bad arguments '%s'", a); return 2; }
  size_t words = (size_t)mib << 17;
  volatile uint64_t *m = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return 1;
  for (size_t i = 0; i < words; i++) m[i] = i; /* fault everything in first */
  double start = now_s(), t = start;
  uint64_t bytes = 0, v = 0;
  while (t - start < (double)secs) {
    for (size_t i = 0; i < words; i++) m[i] = v++;
    bytes += words * 8;
    t = now_s();
  }
  say("membw MiB/s=%.1f", (double)bytes / (1 << 20) / (t - start));
  return 0;
}
