/* blkcheck:mode=write|verify,seed=S,mib=M[,dev=/dev/vda][,repeat=N,delay_ms=D]
 * Layout: sector 0 = header {"FERRYBLK", u64 seed, u64 length, u64 checksum}; data at offset 4096 =
 * splitmix64 words seeded with `seed`; checksum = FNV-1a 64 over the data bytes.
 * verify with repeat=N: N passes D ms apart, each after dropping the device's page cache (BLKFLSBUF), so
 * every pass reads the disk again by DMA into freshly allocated page cache pages; a line every 5 s. */
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  char mode[16] = "verify", dev[64] = "/dev/vda";
  opt_get(a, "mode", mode, sizeof mode);
  opt_get(a, "dev", dev, sizeof dev);
  uint64_t seed = (uint64_t)opt_int(a, "seed", 1);
  uint64_t len = (uint64_t)opt_int(a, "mib", 1) << 20;
  int fd = open(dev, O_RDWR);
  if (fd < 0) { say("blkcheck FAIL cannot open %s", dev); return 1; }
  unsigned char *buf = malloc(len);
  uint64_t s = seed;
  for (uint64_t i = 0; i < len / 8; i++) { uint64_t w = splitmix64(&s); memcpy(buf + i * 8, &w, 8); }
  uint64_t sum = fnv(1469598103934665603ull, buf, len);
  if (strcmp(mode, "write") == 0) {
    unsigned char hdr[4096] = {0};
    memcpy(hdr, "FERRYBLK", 8);
    memcpy(hdr + 8, &seed, 8); memcpy(hdr + 16, &len, 8); memcpy(hdr + 24, &sum, 8);
    if (pwrite(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr || pwrite(fd, buf, len, 4096) != (ssize_t)len || fsync(fd) != 0) {
      say("blkcheck FAIL write error"); return 1;
    }
    say("blkcheck written crc=%016llx", (unsigned long long)sum);
    return 0;
  }
  long long repeat = opt_int(a, "repeat", 1), delay_ms = opt_int(a, "delay_ms", 0);
  if (repeat < 1) repeat = 1;
  unsigned char hdr[32], *got = malloc(len);
  struct timespec t0, now;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long long pass = 1; pass <= repeat; pass++) {
    if (repeat > 1) (void)ioctl(fd, BLKFLSBUF, 0);
    if (pread(fd, hdr, 32, 0) != 32 || memcmp(hdr, "FERRYBLK", 8) != 0) { say("blkcheck FAIL no header pass=%lld", pass); return 1; }
    uint64_t hseed, hlen, hsum;
    memcpy(&hseed, hdr + 8, 8); memcpy(&hlen, hdr + 16, 8); memcpy(&hsum, hdr + 24, 8);
    if (hseed != seed || hlen != len) { say("blkcheck FAIL header seed/len mismatch pass=%lld", pass); return 1; }
    memset(got, 0, len);
    if (pread(fd, got, len, 4096) != (ssize_t)len) { say("blkcheck FAIL read error pass=%lld", pass); return 1; }
    uint64_t gsum = fnv(1469598103934665603ull, got, len);
    if (gsum != sum || hsum != sum) {
      say("blkcheck FAIL crc=%016llx expected=%016llx pass=%lld", (unsigned long long)gsum, (unsigned long long)sum, pass);
      return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (repeat == 1 || pass == repeat || now.tv_sec - t0.tv_sec >= 5) {
      say("blkcheck ok crc=%016llx passes=%lld", (unsigned long long)gsum, pass);
      t0 = now;
    }
    if (delay_ms > 0 && pass < repeat) {
      struct timespec d = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
      nanosleep(&d, 0);
    }
  }
  return 0;
}
