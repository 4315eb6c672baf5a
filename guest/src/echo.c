/* echo:port=P,rcvbuf=BYTES — UDP echo server.
 * The receive buffer is large (default 4 MiB, SO_RCVBUFFORCE as root so net.core.rmem_max does not cap it): when
 * the host does not run the VM for a while (a busy host, a migration's pause), the frames queued meanwhile arrive
 * in one burst, faster than this process gets the CPU back from a busy guest; with the default ~208 KiB (about 90
 * small datagrams at ~2.3 KiB of kernel memory each) a 300 ms stall at 1 kHz overflowed it. */
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "common.h"

int main(int argc, char **argv) {
  const char *args = argc > 1 ? argv[1] : "";
  int port = (int)opt_int(args, "port", 7);
  int rcvbuf = (int)opt_int(args, "rcvbuf", 4 << 20);
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) { say("echo: bind port %d failed", port); return 1; }
  if (rcvbuf > 0 && setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
    (void)setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  int got = 0;
  socklen_t gl = sizeof got;
  getsockopt(s, SOL_SOCKET, SO_RCVBUF, &got, &gl);
  say("echo listening on udp port %d rcvbuf=%d", port, got);
  char buf[2048];
  for (;;) {
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
    if (n >= 0) sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
  }
}
