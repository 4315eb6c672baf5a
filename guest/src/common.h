/* Shared helpers for Ferry's guest programs (static, riscv64). */
#ifndef FERRY_GUEST_COMMON_H
#define FERRY_GUEST_COMMON_H
#include <stdint.h>
#include <stddef.h>

/* Prints one line atomically on stdout (the console): "ferry-guest: <fmt>\n". */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* splitmix64: the PRNG every host-side verifier reimplements (see guest/README.md). */
static inline uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/* Looks up key in "k1=v1,k2=v2"; returns 1 and copies the value if found. */
int opt_get(const char *args, const char *key, char *out, size_t outlen);
long long opt_int(const char *args, const char *key, long long def);
double now_s(void);
#endif
