/* memdirty:mib=N,rate=PAGES_PER_S|max,bytes=B,verify=SECS
 * Dirties random pages at a steady rate with a verifiable pattern (see guest/README.md):
 *   page p at generation g holds  PRNG(p,g)[0:B] ++ PRNG(p,0)[B:4096]   (g = 0: PRNG(p,0) entirely)
 * where PRNG(p,g) is the splitmix64 word stream seeded with seed(p,g). gen[] lives in guest memory too,
 * so a migration that loses or reorders any page write is detected by the verifier. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common.h"

#define PAGE 4096
static volatile sig_atomic_t verify_now;
static void on_usr1(int s) { (void)s; verify_now = 1; }

static uint64_t seed_of(uint64_t p, uint64_t g) { return (p * 0x9E3779B97F4A7C15ull) ^ (g * 0xD1B54A32D192ED03ull) ^ 0x5EEDF00Dull; }

static void fill(uint64_t *dst, uint64_t p, uint64_t g, size_t words) {
  uint64_t s = seed_of(p, g);
  for (size_t i = 0; i < words; i++) dst[i] = splitmix64(&s);
}

static int verify(uint64_t *mem, uint32_t *gen, size_t pages, size_t bwords) {
  uint64_t expect[PAGE / 8];
  for (size_t p = 0; p < pages; p++) {
    uint64_t *pg = mem + p * (PAGE / 8);
    fill(expect, p, 0, PAGE / 8);
    if (gen[p]) fill(expect, p, gen[p], bwords);
    for (size_t i = 0; i < PAGE / 8; i++)
      if (pg[i] != expect[i]) {
        say("memverify FAIL page=%zu gen=%u offset=%zu", p, gen[p], i * 8);
        return 0;
      }
  }
  say("memverify ok pages=%zu", pages);
  return 1;
}

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  long long mib = opt_int(a, "mib", 64), rate = opt_int(a, "rate", 20000), bytes = opt_int(a, "bytes", 4096);
  long long verify_every = opt_int(a, "verify", 10);
  if (mib <= 0 || bytes < 8 || bytes > PAGE || rate < 0) { say("memdirty: bad arguments '%s'", a); return 2; }
  size_t bwords = (size_t)(bytes + 7) / 8;
  size_t pages = (size_t)mib * 256;
  uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint32_t *gen = calloc(pages, sizeof *gen);
  if (mem == MAP_FAILED || !gen) { say("memdirty: out of memory"); return 1; }
  for (size_t p = 0; p < pages; p++) fill(mem + p * (PAGE / 8), p, 0, PAGE / 8);
  signal(SIGUSR1, on_usr1);
  say("memdirty started mib=%lld rate=%lld bytes=%lld", mib, rate, bytes);

  uint64_t rng = 0x1234567ull, done = 0, window_done = 0;
  double start = now_s(), last_stat = start, last_verify = start;
  for (;;) {
    double t = now_s();
    uint64_t target = rate ? (uint64_t)((t - start) * (double)rate) : done + 256;
    if (target > done + 4096) { start = t - (double)done / (double)rate; target = done; } /* don't burst after a stall */
    while (done < target) {
      size_t p = (size_t)(splitmix64(&rng) % pages);
      uint32_t g = gen[p] + 1;
      fill(mem + p * (PAGE / 8), p, g, bwords);
      gen[p] = g;
      done++;
      window_done++;
    }
    if (verify_now) { verify_now = 0; verify(mem, gen, pages, bwords); }
    if (verify_every > 0 && t - last_verify >= (double)verify_every) { verify(mem, gen, pages, bwords); last_verify = now_s(); }
    if (t - last_stat >= 5.0) {
      say("memdirty rate=%.0f pages/s", (double)window_done / (t - last_stat));
      window_done = 0;
      last_stat = t;
    }
    if (rate) { struct timespec ts = {0, 1000000}; nanosleep(&ts, NULL); }
  }
}
