/* Ferry guest /init: mounts, network from ferry.ip=, workloads from ferry.run=, console commands. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define MAX_WL 8
static struct { pid_t pid; char name[32]; } wl[MAX_WL];
static int nwl;

static void on_child(int sig) {
  (void)sig;
  int st;
  pid_t p;
  while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
    for (int i = 0; i < nwl; i++)
      if (wl[i].pid == p) {
        say("workload %s exited status %d", wl[i].name, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        wl[i].pid = 0;
      }
  }
}

static int if_up(int s, const char *name, const char *addr, int prefix) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
  if (addr) {
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) return -1;
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) return -1;
    sin->sin_addr.s_addr = htonl(prefix ? 0xffffffffu << (32 - prefix) : 0);
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) return -1;
  }
  if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return -1;
  ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
  return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static void setup_net(const char *ip) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  if (s < 0) { say("network: socket failed: %s", strerror(errno)); return; }
  if_up(s, "lo", "127.0.0.1", 8);
  if (ip && *ip) {
    char a[64];
    snprintf(a, sizeof a, "%s", ip);
    char *slash = strchr(a, '/');
    int prefix = 24;
    if (slash) { *slash = 0; prefix = atoi(slash + 1); }
    if (if_up(s, "eth0", a, prefix) < 0) say("network: eth0 %s/%d failed: %s", a, prefix, strerror(errno));
    else say("network: eth0 %s/%d up", a, prefix);
  }
  close(s);
}

static void start_workload(const char *spec) {
  char name[32];
  const char *colon = strchr(spec, ':');
  size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
  if (n == 0 || n >= sizeof name) return;
  memcpy(name, spec, n);
  name[n] = 0;
  char path[64];
  snprintf(path, sizeof path, "/bin/%s", name);
  if (access(path, X_OK) != 0) { say("unknown workload '%s'", name); return; }
  if (nwl >= MAX_WL) return;
  pid_t p = fork();
  if (p == 0) {
    char *argv[] = {path, (char *)(colon ? colon + 1 : ""), NULL};
    execv(path, argv);
    _exit(127);
  }
  wl[nwl].pid = p;
  snprintf(wl[nwl].name, sizeof wl[nwl].name, "%s", name);
  nwl++;
}

/* One line from /proc/meminfo's MemTotal, MemFree, MemAvailable (kB); used = total - free. */
static void say_meminfo(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  if (!f) { say("meminfo unavailable: %s", strerror(errno)); return; }
  long long total = -1, free_kb = -1, avail = -1, v;
  char line[128], key[64];
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "%63[^:]: %lld", key, &v) == 2) {
      if (strcmp(key, "MemTotal") == 0) total = v;
      else if (strcmp(key, "MemFree") == 0) free_kb = v;
      else if (strcmp(key, "MemAvailable") == 0) avail = v;
    }
  fclose(f);
  say("meminfo total_kb=%lld free_kb=%lld available_kb=%lld used_kb=%lld", total, free_kb, avail,
      total >= 0 && free_kb >= 0 ? total - free_kb : -1);
}

/* Network counters on one line: UDP (from /proc/net/snmp), eth0 (sysfs) and the softnet backlog drops. */
static long long sysfs_counter(const char *name) {
  char path[96];
  snprintf(path, sizeof path, "/sys/class/net/eth0/statistics/%s", name);
  FILE *f = fopen(path, "r");
  long long v = -1;
  if (f) { if (fscanf(f, "%lld", &v) != 1) v = -1; fclose(f); }
  return v;
}

static void say_netstat(void) {
  long long udp[9];
  int n = 0;
  for (int i = 0; i < 9; i++) udp[i] = -1;
  FILE *f = fopen("/proc/net/snmp", "r");
  char line[512];
  int seen_header = 0;
  while (f && fgets(line, sizeof line, f)) {
    if (strncmp(line, "Udp: ", 5) != 0) continue;
    if (!seen_header) { seen_header = 1; continue; }  /* the first Udp: line names the fields */
    n = sscanf(line + 5, "%lld %lld %lld %lld %lld %lld %lld %lld %lld", &udp[0], &udp[1], &udp[2], &udp[3], &udp[4],
               &udp[5], &udp[6], &udp[7], &udp[8]);
    break;
  }
  if (f) fclose(f);
  long long backlog_drops = 0;
  unsigned processed, dropped;
  f = fopen("/proc/net/softnet_stat", "r");
  while (f && fscanf(f, "%x %x%*[^\n]", &processed, &dropped) == 2) backlog_drops += dropped;
  if (f) fclose(f);
  /* Udp fields: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors */
  say("netstat udp_in=%lld udp_noports=%lld udp_inerrors=%lld udp_out=%lld udp_rcvbuf_errors=%lld udp_sndbuf_errors=%lld "
      "eth0_rx_packets=%lld eth0_rx_dropped=%lld eth0_tx_packets=%lld eth0_tx_dropped=%lld backlog_drops=%lld fields=%d",
      udp[0], udp[1], udp[2], udp[3], udp[4], udp[5], sysfs_counter("rx_packets"), sysfs_counter("rx_dropped"),
      sysfs_counter("tx_packets"), sysfs_counter("tx_dropped"), backlog_drops, n);
}

static void signal_workload(const char *name, int sig) {
  int found = 0;
  for (int i = 0; i < nwl; i++)
    if (wl[i].pid && strcmp(wl[i].name, name) == 0) { kill(wl[i].pid, sig); found = 1; }
  if (!found) say("no running workload %s", name);
}

int main(void) {
  mkdir("/proc", 0755); mkdir("/sys", 0755); mkdir("/dev", 0755);
  mount("proc", "/proc", "proc", 0, NULL);
  mount("sysfs", "/sys", "sysfs", 0, NULL);
  mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
  int fd = open("/dev/console", O_RDWR);
  if (fd >= 0) { dup2(fd, 0); dup2(fd, 1); dup2(fd, 2); if (fd > 2) close(fd); }
  setvbuf(stdout, NULL, _IONBF, 0);
  signal(SIGCHLD, on_child);

  char cmdline[2048] = {0};
  int c = open("/proc/cmdline", O_RDONLY);
  if (c >= 0) { ssize_t r = read(c, cmdline, sizeof cmdline - 1); if (r > 0) cmdline[r] = 0; close(c); }
  char ip[64] = {0}, run[1024] = {0};
  for (char *tok = strtok(cmdline, " \n"); tok; tok = strtok(NULL, " \n")) {
    if (strncmp(tok, "ferry.ip=", 9) == 0) snprintf(ip, sizeof ip, "%s", tok + 9);
    if (strncmp(tok, "ferry.run=", 10) == 0) snprintf(run, sizeof run, "%s", tok + 10);
  }
  setup_net(ip);
  /* workloads separated by ';' or '+' */
  for (char *save = NULL, *w = strtok_r(run, ";+", &save); w; w = strtok_r(NULL, ";+", &save)) start_workload(w);
  say("ready");

  char line[256];
  size_t len = 0;
  for (;;) {
    char ch;
    ssize_t r = read(0, &ch, 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) { pause(); continue; }
    if (ch == '\r' || ch == '\n') {
      line[len] = 0;
      len = 0;
      if (strcmp(line, "memverify") == 0) signal_workload("memdirty", SIGUSR1);
      else if (strcmp(line, "status") == 0) {
        for (int i = 0; i < nwl; i++) say("workload %s pid=%d %s", wl[i].name, wl[i].pid, wl[i].pid ? "running" : "exited");
        say_meminfo();
      } else if (strcmp(line, "netstat") == 0) say_netstat();
      else if (strcmp(line, "poweroff") == 0) {
        say("powering off");
        sync();
        reboot(RB_POWER_OFF);
      } else if (line[0]) say("unknown command '%s'", line);
    } else if (len < sizeof line - 1) line[len++] = ch;
  }
}
