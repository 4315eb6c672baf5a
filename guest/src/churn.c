/* churn:mib=N[,secs=S] — allocate, fill, free repeatedly (drives free page reporting). */
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common.h"

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  long long mib = opt_int(a, "mib", 32), secs = opt_int(a, "secs", 0);
  if (mib <= 0) { say("churn: bad arguments '%s'", a); return 2; }
  size_t len = (size_t)mib << 20;
  double start = now_s(), last = start;
  unsigned long rounds = 0;
  for (;;) {
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { say("churn: mmap failed"); return 1; }
    memset(p, (int)(rounds & 0xff) | 1, len);
    munmap(p, len);
    rounds++;
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, NULL);
    double t = now_s();
    if (t - last >= 5.0) { say("churn rounds=%lu mib=%lld", rounds, mib); last = t; }
    if (secs > 0 && t - start >= (double)secs) { say("churn done rounds=%lu", rounds); return 0; }
  }
}
