#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void say(const char *fmt, ...) {
  char buf[512];
  int n = snprintf(buf, sizeof buf, "ferry-guest: ");
  va_list ap;
  va_start(ap, fmt);
  n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
  va_end(ap);
  if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
  buf[n++] = '\n';
  ssize_t r = write(1, buf, (size_t)n);
  (void)r;
}

int opt_get(const char *args, const char *key, char *out, size_t outlen) {
  size_t kl = strlen(key);
  const char *p = args;
  while (p && *p) {
    if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
      const char *v = p + kl + 1;
      size_t n = strcspn(v, ",");
      if (n >= outlen) n = outlen - 1;
      memcpy(out, v, n);
      out[n] = 0;
      return 1;
    }
    p = strchr(p, ',');
    if (p) p++;
  }
  return 0;
}

long long opt_int(const char *args, const char *key, long long def) {
  char v[64];
  if (!opt_get(args, key, v, sizeof v)) return def;
  if (strcmp(v, "max") == 0) return 0;
  return atoll(v);
}

double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}
