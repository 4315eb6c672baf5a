/* echo:port=P — UDP echo server. */
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "common.h"

int main(int argc, char **argv) {
  int port = (int)opt_int(argc > 1 ? argv[1] : "", "port", 7);
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) { say("echo: bind port %d failed", port); return 1; }
  say("echo listening on udp port %d", port);
  char buf[2048];
  for (;;) {
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
    if (n >= 0) sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
  }
}
