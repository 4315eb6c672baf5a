/* churn:mib=N[,secs=S][,rounds=K] — allocate, fill, free repeatedly (drives free page reporting).
 * The fill is splitmix64 words, fresh every round: freed pages then hold data that neither compresses nor
 * deduplicates away, so a migration only saves their transfer by really skipping them (free page reporting).
 * rounds=K stops after K rounds and idles, so a test can "fill and free N MiB, then migrate". */
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static void fill(uint64_t *p, size_t words, uint64_t *s) {
  for (size_t i = 0; i < words; i++) p[i] = splitmix64(s);
}

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  long long mib = opt_int(a, "mib", 32), secs = opt_int(a, "secs", 0), max_rounds = opt_int(a, "rounds", 0);
  if (mib <= 0 || max_rounds < 0) { say("churn: bad arguments '%s'", a); return 2; }
  size_t len = (size_t)mib << 20;
  uint64_t seed = 0xC4024ull;
  double start = now_s(), last = start;
  unsigned long rounds = 0;
  for (;;) {
    uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { say("churn: mmap failed"); return 1; }
    fill(p, len / 8, &seed);
    munmap(p, len);
    rounds++;
    if (max_rounds > 0 && rounds >= (unsigned long)max_rounds) {
      say("churn done rounds=%lu", rounds);
      for (;;) pause(); /* stay alive: an exit would be reported as a workload ending */
    }
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, NULL);
    double t = now_s();
    if (t - last >= 5.0) { say("churn rounds=%lu mib=%lld", rounds, mib); last = t; }
    if (secs > 0 && t - start >= (double)secs) { say("churn done rounds=%lu", rounds); return 0; }
  }
}
