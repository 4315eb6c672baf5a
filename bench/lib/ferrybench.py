"""Shared pieces of the live-migration benchmarks (bench/migrate-vs-qemu, bench/ablation).

Topology (created and removed here): namespace A (NS_A) holds bridge br0 (10.77.0.1/24) with the source's
TAP (fmqsrc); the guest is GUEST_IP and answers UDP echo on port 7; a 1 kHz UDP echo client
(ferry-udp-probe) in A measures service downtime (longest gap between replies).
  link "loopback": the destination's TAP (fmqdst) is on the same bridge and both VMMs talk over 127.0.0.1
                   in A; wire bytes are lo's tx counter.
  link "tbf":      namespace B holds its own bridge (10.77.0.3) with the destination's TAP; a veth pair
                   (fmqva in A, fmqvb in B) joins the two bridges and carries migration and guest traffic,
                   with a tbf qdisc (1 Gbit/s) on both ends; wire bytes are fmqva's tx counter.
Also: starting Ferry and QEMU source/destination VMMs with the same guest, the QMP client, the probe,
one Ferry (`ferry migrate --json`) or QEMU (QMP `migrate`, cancelled after a timeout, optionally switched to
post-copy) migration and the figures both benchmarks keep of it, guest console helpers (memverify, cpubench
scores timestamped as they appear, guest slowdown), the run matrix (one JSON line per run, failures kept), and
report helpers (number format, QEMU's best per metric, the acceptance table, the bar chart grid).

Transport: Ferry migrates over mutual TLS when use_tls() was called (a throwaway PKI from scripts/make-pki: the
destination's certificate names 127.0.0.1 and 10.77.0.3), else over plaintext tcp: (the tbf link's destination
listens on 10.77.0.3 with --allow-plaintext: the namespaces are this benchmark's own).

Debugging aids (environment): FERRY_BENCH_SRC_ARGS adds arguments to every Ferry source VMM (e.g.
"--log-level debug" for the engine's per-look lines); FERRY_BENCH_KEEP_LOGS=DIR keeps each run's VMM logs as
DIR/<link>-<workload>-<vmm>-<config>-<rep>-{src,dst}.log.
"""
import json, math, os, re, shlex, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "build/bin")
IMAGE = os.path.join(ROOT, "build/guest/Image")
INITRD = os.path.join(ROOT, "build/guest/initramfs.cpio")
NS_A, NS_B = "fmq-a", "fmq-b"
GUEST_IP, MAC = "10.77.0.2", "52:54:00:4d:51:01"
PORT = 7400  # migration port on the destination
# The setup both benchmarks share: guest RAM, Ferry's channels, the downtime limit for both VMMs, how long a QEMU
# pre-copy may run before it is cancelled, and the bandwidth given to the VMMs per link (loopback: 1 Gbit/s in
# the VMMs; tbf: the link itself is 1 Gbit/s, so no cap, but QEMU needs a number: its default is 32 MiB/s).
MEM = "512M"
CHANNELS, DOWNTIME_MS = 4, 300
QEMU_TIMEOUT_S = 30
LINK_CAP = {"loopback": 125000000, "tbf": None}  # bytes/s given to the VMMs; None: no cap
QEMU_UNCAPPED = 10 * 1024 ** 3


TLS = None  # use_tls(): {"dir": PKI directory}


def use_tls(work_dir):
    """Ferry migrations from now on use tls: with certificates made by scripts/make-pki in WORK_DIR/pki."""
    global TLS
    pki = os.path.join(work_dir, "pki")
    sh(f"{ROOT}/scripts/make-pki {pki} src dst,127.0.0.1,10.77.0.3 >/dev/null")
    TLS = {"dir": pki}


def tls_flags(host):
    """ferry-vmm --incoming / ferry migrate flags for `host` ("src" or "dst") under use_tls()."""
    d = TLS["dir"]
    return ["--tls-cert", f"{d}/{host}.crt", "--tls-key", f"{d}/{host}.key", "--tls-ca", f"{d}/ca.crt"]


def use_build(build_dir):
    """Take ferry-vmm, ferry, ferry-udp-probe from BUILD/bin and the guest from BUILD/guest (default: the
    tree's build/). Lets a long benchmark run on a pinned copy while the tree's build/ is rebuilt."""
    global BIN, IMAGE, INITRD
    BIN = os.path.join(build_dir, "bin")
    IMAGE = os.path.join(build_dir, "guest/Image")
    INITRD = os.path.join(build_dir, "guest/initramfs.cpio")


def build_info():
    """What is being measured: the binaries' and guest's sha256 prefixes and the tree's commit."""
    import hashlib
    info = {"bin": BIN}
    for name, path in (("ferry_vmm", os.path.join(BIN, "ferry-vmm")), ("ferry", os.path.join(BIN, "ferry")),
                       ("image", IMAGE), ("initrd", INITRD)):
        try:
            with open(path, "rb") as f:
                info[name + "_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
        except OSError:
            info[name + "_sha256"] = None
    info["commit"] = sh(f"git -C {ROOT} rev-parse --short HEAD", check=False).strip()
    return info


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout


def ns(name):
    return ["ip", "netns", "exec", name]


# ---------------------------------------------------------------- topology
def topology_up(link):
    topology_down()
    sh(f"ip netns add {NS_A}")
    cmds = [f"ip link set lo up", "ip link add br0 type bridge", "ip addr add 10.77.0.1/24 dev br0",
            "ip link set br0 up", "ip tuntap add dev fmqsrc mode tap vnet_hdr", "ip link set fmqsrc master br0",
            "ip link set fmqsrc up"]
    if link == "loopback":
        cmds += ["ip tuntap add dev fmqdst mode tap vnet_hdr", "ip link set fmqdst master br0", "ip link set fmqdst up"]
    for c in cmds:
        sh(f"ip netns exec {NS_A} {c}")
    if link == "tbf":
        sh(f"ip netns add {NS_B}")
        sh(f"ip link add fmqva netns {NS_A} type veth peer name fmqvb netns {NS_B}")
        for c in ["ip link set lo up", "ip link add br0 type bridge", "ip addr add 10.77.0.3/24 dev br0",
                  "ip link set br0 up", "ip tuntap add dev fmqdst mode tap vnet_hdr", "ip link set fmqdst master br0",
                  "ip link set fmqdst up", "ip link set fmqvb master br0", "ip link set fmqvb up",
                  "tc qdisc add dev fmqvb root tbf rate 1gbit burst 256kb latency 20ms"]:
            sh(f"ip netns exec {NS_B} {c}")
        for c in ["ip link set fmqva master br0", "ip link set fmqva up",
                  "tc qdisc add dev fmqva root tbf rate 1gbit burst 256kb latency 20ms"]:
            sh(f"ip netns exec {NS_A} {c}")


def topology_down():
    sh(f"ip netns del {NS_A} 2>/dev/null; ip netns del {NS_B} 2>/dev/null", check=False)


def wire_bytes(link):
    """tx bytes of the interface that carries the migration, from the source's side."""
    dev = "lo" if link == "loopback" else "fmqva"
    return int(sh(f"ip netns exec {NS_A} cat /sys/class/net/{dev}/statistics/tx_bytes").strip())


def dest_ns(link):
    return NS_A if link == "loopback" else NS_B


def dest_ip(link):
    return "127.0.0.1" if link == "loopback" else "10.77.0.3"


# ---------------------------------------------------------------- helpers
def cpu_seconds(pid):
    """user + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_file(path, pattern, timeout, start=0):
    """True once `pattern` (a regex) appears in the file at or after character `start`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if re.search(pattern, read_text(path)[start:]):
            return True
        time.sleep(0.05)
    return False


def dirty_rate_from_console(path):
    rates = re.findall(r"memdirty rate=(\d+)", read_text(path))
    return int(rates[-1]) if rates else None


def wait_listen(nsname, port, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if "LISTEN" in sh(f"ip netns exec {nsname} ss -Hltn 'sport = :{port}'", check=False):
            return True
        time.sleep(0.05)
    return False


def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return statistics.median(xs) if xs else None


class Qmp:
    def __init__(self, path, timeout=10):
        end = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args} if args else {"execute": name}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r.get("return")


class Probe:
    """ferry-udp-probe at 1 kHz against the guest's echo port, from namespace A."""

    def __init__(self, work):
        self.out = open(os.path.join(work, "probe.json"), "w+")
        self.p = subprocess.Popen(ns(NS_A) + [os.path.join(BIN, "ferry-udp-probe"), "--to", f"{GUEST_IP}:7"],
                                  stdout=self.out, stderr=subprocess.DEVNULL)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(10)
        self.out.seek(0)
        line = self.out.readline()
        return json.loads(line) if line else None


# ---------------------------------------------------------------- VMMs
class Vmm:
    """A VMM process. With console_input the guest console is the process's stdio (stdin a pipe, so
    console commands can be typed with send()); otherwise the VMM writes the console to a file itself."""

    def __init__(self, argv, console, log, console_input):
        self.console = console
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE if console_input else subprocess.DEVNULL,
                                  stdout=open(console, "w") if console_input else subprocess.DEVNULL,
                                  stderr=open(log, "w"))
        self.pid = self.p.pid

    def send(self, line):
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def kill(self):
        self.p.kill()
        self.p.wait()


def guest_cmdline(run):
    """Kernel command line: the workload(s) `run` (may be empty) plus the UDP echo server on port 7."""
    return f"console=ttyS0 ferry.ip={GUEST_IP}/24 ferry.run=" + (run + ";" if run else "") + "echo:port=7"


def start_ferry_source(work, cmdline, mem, extra=(), console_input=False):
    con = os.path.join(work, "ferry-src.console")
    sock = os.path.join(work, "src.sock")
    argv = ns(NS_A) + [os.path.join(BIN, "ferry-vmm"), "--kernel", IMAGE, "--initrd", INITRD, "--mem", mem,
                       "--cmdline", cmdline, "--net", f"tap=fmqsrc,mac={MAC}", "--api-socket", sock,
                       "--console", "stdio" if console_input else f"file:{con}", *extra,
                       *shlex.split(os.environ.get("FERRY_BENCH_SRC_ARGS", ""))]
    v = Vmm(argv, con, os.path.join(work, "src.log"), console_input)
    v.api_socket = sock
    return v


def start_ferry_dest(work, link, console_input=False):
    con = os.path.join(work, "ferry-dst.console")
    security = tls_flags("dst") if TLS else ([] if link == "loopback" else ["--allow-plaintext"])
    argv = ns(dest_ns(link)) + [os.path.join(BIN, "ferry-vmm"), "--incoming",
                                f"{'tls' if TLS else 'tcp'}:{dest_ip(link)}:{PORT}", *security,
                                "--net", "tap=fmqdst", "--console", "stdio" if console_input else f"file:{con}",
                                "--api-socket", os.path.join(work, "dst.sock")]
    v = Vmm(argv, con, os.path.join(work, "dst.log"), console_input)
    v.api_socket = os.path.join(work, "dst.sock")
    return v


def start_qemu(work, link, role, cmdline, mem, extra=(), console_input=False):
    """role: "src" (boots, namespace A, TAP fmqsrc) or "dst" (-incoming defer, TAP fmqdst)."""
    con = os.path.join(work, f"qemu-{role}.console")
    argv = ns(NS_A if role == "src" else dest_ns(link)) + [
        "qemu-system-riscv64", "-M", "virt", "-m", mem, "-smp", "1", "-display", "none", "-monitor", "none",
        "-kernel", IMAGE, "-initrd", INITRD, "-append", cmdline,
        "-serial", "stdio" if console_input else f"file:{con}", "-qmp", f"unix:{work}/{role}.qmp,server=on,wait=off",
        "-netdev", f"tap,id=n0,ifname={'fmqsrc' if role == 'src' else 'fmqdst'},script=no,downscript=no",
        "-device", f"virtio-net-device,netdev=n0,mac={MAC}", *extra]
    if role == "dst":
        argv += ["-incoming", "defer"]
    v = Vmm(argv, con, os.path.join(work, f"{role}.log"), console_input)
    v.qmp_path = f"{work}/{role}.qmp"
    return v


def ferry_api_get(vmm, path="/vm", timeout=5):
    """GET on a ferry-vmm's API socket; the parsed JSON body or None."""
    r = subprocess.run(["curl", "-s", "--max-time", str(timeout), "--unix-socket", vmm.api_socket, f"http://ferry{path}"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def ferry_balloon_metrics(vmm):
    """The virtio-balloon device's metrics from GET /vm (discarded_bytes, reported_bytes, ...) or None."""
    vm = ferry_api_get(vmm)
    for dev in ((vm or {}).get("devices") or {}).values():
        if isinstance(dev, dict) and dev.get("kind") == "virtio-balloon":
            return dev
    return None


def console_command(vmm, command, pattern, timeout):
    """Types `command` on the guest console (needs console_input) and returns the last match of `pattern` (a
    regex; end it with \\n so that a line still being written does not match) in what the console printed after
    it, or None after `timeout` seconds."""
    start = len(read_text(vmm.console))
    vmm.send(command)
    if not wait_file(vmm.console, pattern, timeout, start):
        return None
    return list(re.finditer(pattern, read_text(vmm.console)[start:]))[-1]


def guest_meminfo(vmm, timeout=10):
    """The guest's meminfo line (console command `status`) as a dict of kB values (total_kb, free_kb,
    available_kb, used_kb), or None. Needs console_input."""
    m = console_command(vmm, "status", r"meminfo total_kb=(-?\d+) free_kb=(-?\d+) available_kb=(-?\d+) used_kb=(-?\d+)\r?\n",
                        timeout)
    return dict(zip(("total_kb", "free_kb", "available_kb", "used_kb"), map(int, m.groups()))) if m else None


def memverify(vmm, timeout=60):
    """memdirty's answer to the console command `memverify`, "memverify ok pages=N" or "memverify FAIL ...", or
    "no answer in TIMEOUT s". Needs console_input."""
    m = console_command(vmm, "memverify", r"memverify (ok|FAIL)[^\n]*\n", timeout)
    return m.group(0).strip() if m else f"no answer in {timeout} s"


def guest_netstat(vmm, timeout=5):
    """The guest's network counters (console command `netstat`) as a dict, or None. Needs console_input."""
    m = console_command(vmm, "netstat", r"netstat ((?:\w+=-?\d+ ?)+)\r?\n", timeout)
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())} if m else None


def tap_counters(link, role):
    """Host-side counters of the source's or destination's TAP (tx: frames the host handed to the VMM)."""
    dev, nsname = ("fmqsrc", NS_A) if role == "src" else ("fmqdst", dest_ns(link))
    return {k: int(sh(f"ip netns exec {nsname} cat /sys/class/net/{dev}/statistics/{k}", check=False).strip() or -1)
            for k in ("tx_packets", "tx_dropped", "rx_packets")}


CPUBENCH_SCORE = r"cpubench score=(\d+) units/s seq=(\d+)"  # guest/src/cpubench.c with every_ms=


class ConsoleWatch:
    """Timestamps guest console lines as they appear: a thread reads the console files every `period` s and keeps
    (host time.monotonic(), regex match) for each new complete line that matches `pattern`. Several files, because
    after a migration the guest prints on the destination's console. What a file holds when the watch starts is
    skipped (its arrival time is unknown)."""

    def __init__(self, paths, pattern=CPUBENCH_SCORE, period=0.02):
        self.paths, self.pattern, self.period = list(paths), re.compile(pattern), period
        self.samples = []
        self._pos = [os.path.getsize(p) if os.path.exists(p) else 0 for p in self.paths]
        self._rest = [b""] * len(self.paths)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _poll(self):
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self._pos[i])
                    data = f.read()
            except OSError:
                continue
            now = time.monotonic()
            self._pos[i] += len(data)
            *lines, self._rest[i] = (self._rest[i] + data).split(b"\n")
            for line in lines:
                m = self.pattern.search(line.decode(errors="replace"))
                if m:
                    self.samples.append((now, m))

    def _run(self):
        while not self._stop.wait(self.period):
            self._poll()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._poll()
        return self.samples


def guest_slowdown(scores, t0, t1, every_s, before_s=3.0):
    """How much a migration from host time t0 to t1 slowed the guest, from cpubench's per-interval scores
    (`scores`: (arrival time, score) pairs, e.g. from a ConsoleWatch). before: the median score of the lines that
    arrived in the before_s seconds before t0. during: the lines whose interval (arrival - every_s .. arrival)
    overlaps t0..t1. slowdown = 1 - their mean / before, worst = 1 - their minimum / before (scores are per
    second of the guest's clock). wall = 1 - their work (score x every_s each) / (before x the host time they
    span), which also counts time in which the guest did not run and that its clock did not see."""
    before = [s for t, s in scores if t0 - before_s <= t < t0]
    during = [(t, s) for t, s in scores if t > t0 and t - every_s < t1]
    r = {"score_before": statistics.median(before) if before else None, "samples_before": len(before),
         "samples_during": len(during), "score_during_mean": None, "score_during_min": None,
         "slowdown": None, "slowdown_worst": None, "slowdown_wall": None}
    if during:
        r["score_during_mean"] = statistics.mean(s for _, s in during)
        r["score_during_min"] = min(s for _, s in during)
    b = r["score_before"]
    if b and during:
        span = during[-1][0] - (during[0][0] - every_s)
        r["slowdown"] = 1 - r["score_during_mean"] / b
        r["slowdown_worst"] = 1 - r["score_during_min"] / b
        r["slowdown_wall"] = 1 - sum(s for _, s in during) * every_s / (b * span)
    return r


def ferry_memfd_nonzero_pages(pid, page=4096):
    """Counts non-zero pages of a ferry-vmm's guest RAM by reading its memfd (/proc/PID/fd/N ->
    /memfd:ferry-guest-ram) with read(2), which returns zeros for holes without allocating them.
    Returns (nonzero_pages, total_pages) or None."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("/memfd:ferry-guest-ram"):
            zero = bytes(page)
            nonzero = total = 0
            with open(os.path.join(fd_dir, fd), "rb", buffering=0) as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    for off in range(0, len(chunk), page):
                        total += 1
                        if chunk[off:off + page] != zero:
                            nonzero += 1
            return nonzero, total
    return None


def ferry_migrate(src, link, migrate_args, timeout=300):
    """`ferry migrate --json` from the source VMM to the destination; returns (status dict or error dict,
    returncode, wall seconds, source CPU seconds)."""
    cpu0, t0 = cpu_seconds(src.pid), time.monotonic()
    r = subprocess.run([os.path.join(BIN, "ferry"), "migrate", "--api-socket", src.api_socket, "--to",
                        f"{'tls' if TLS else 'tcp'}:{dest_ip(link)}:{PORT}", *(tls_flags("src") if TLS else []),
                        *migrate_args, "--json", "--no-progress", "--keep-source"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(src.pid) - cpu0
    try:
        st = json.loads(r.stdout)
    except ValueError:
        st = {"status": "error", "error": (r.stderr or r.stdout).strip()[-2000:]}
    return st, r.returncode, wall, cpu


# What the benchmarks keep of `ferry migrate --json` (see docs/ARCHITECTURE.md and the migration status object).
FERRY_FIELDS = ("total_ms", "downtime_ms", "predicted_downtime_ms", "stop", "iterations", "transferred_bytes",
                "resent_bytes", "pages_by_encoding", "source_cpu_ms", "codec", "downtime_phases", "history", "error",
                "mode", "postcopy_ms", "postcopy_pages", "recoveries", "throttle_max_pct", "demand_faults",
                "fault_latency_ms")


def ferry_result(st, rc):
    """The figures of one Ferry migration (ferry_migrate's status dict and exit code) as a row's fields."""
    completed = rc == 0 and st.get("status") == "completed"
    res = {k: st.get(k) for k in FERRY_FIELDS}
    res.update({"completed": completed, "converged": bool(completed and st.get("converged"))})
    return res


def qemu_prepare(qs, qd, link, caps, params, max_bandwidth, downtime_ms):
    """Sets the capabilities `caps` and parameters `params` on both QEMUs (QMP clients qs, qd), the source's
    max-bandwidth and downtime-limit, and lets the destination listen (migrate-incoming)."""
    for q in (qs, qd):
        if caps:
            q.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        if params:
            q.cmd("migrate-set-parameters", **params)
    qs.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth, "downtime-limit": downtime_ms})
    qd.cmd("migrate-incoming", uri=f"tcp:{dest_ip(link)}:{PORT}")


def qemu_migrate(qs, src, link, timeout_s, postcopy_after_s=None):
    """QMP migrate on the source; polls query-migrate. postcopy_after_s: `migrate-start-postcopy` once the
    migration has been running that long and is still a pre-copy (needs capability postcopy-ram on both sides).
    A pre-copy still running after timeout_s is cancelled; a post-copy cannot be (the guest runs on the
    destination): it is waited for up to timeout_s + 120 s in all, then given up (status postcopy-active).
    Returns (last info, cancelled, wall seconds, source CPU seconds, dirty-pages-rate seen last while active,
    seconds after migrate at which post-copy was started or None)."""
    cpu0, t0 = cpu_seconds(src.pid), time.monotonic()
    qs.cmd("migrate", uri=f"tcp:{dest_ip(link)}:{PORT}")
    info, cancelled, last_rate, postcopy_at = {}, False, None, None
    while True:
        info = qs.cmd("query-migrate")
        status, elapsed = info.get("status"), time.monotonic() - t0
        if status == "active" and info.get("ram", {}).get("dirty-pages-rate"):
            last_rate = info["ram"]["dirty-pages-rate"]
        if status in ("completed", "failed", "cancelled") or elapsed > timeout_s + 120:
            break
        if status == "active" and postcopy_after_s is not None and postcopy_at is None and elapsed >= postcopy_after_s:
            qs.cmd("migrate-start-postcopy")
            postcopy_at = elapsed
        if status == "active" and elapsed > timeout_s and not cancelled:
            qs.cmd("migrate_cancel")
            cancelled = True
        time.sleep(0.02)
    wall = time.monotonic() - t0
    return info, cancelled, wall, cpu_seconds(src.pid) - cpu0, last_rate, postcopy_at


def qemu_result(info, cancelled, wall, last_rate, timeout_s):
    """The figures of one QEMU migration (qemu_migrate's results) as a row's fields, named as Ferry's."""
    status = info.get("status")
    completed = status == "completed"
    ram = info.get("ram", {})
    error = info.get("error-desc") or (f"not converged within {timeout_s} s (cancelled)" if cancelled else None)
    if not completed and not error:
        error = f"status {status} after {wall:.0f} s"
    total, downtime = info.get("total-time", wall * 1000), info.get("downtime")
    res = {"total_ms": total, "downtime_ms": downtime, "converged": completed, "completed": completed,
           "iterations": ram.get("dirty-sync-count"), "transferred_bytes": ram.get("transferred"), "qemu_ram": ram,
           "migration_dirty_rate": last_rate, "error": error}
    if downtime is not None and downtime > total:
        # QEMU 7.2 after migrate-start-postcopy sometimes reports the host's uptime (a pause never started)
        res.update({"downtime_ms": None, "qemu_downtime_invalid": downtime})
    return res


# ---------------------------------------------------------------- the run matrix
def selection(prog, lists):
    """{name: [items]} from {name: (comma-separated command line value, the known items)}; exits naming the known
    items when an item is not one of them."""
    sel = {}
    for name, (val, known) in lists.items():
        sel[name] = [x for x in val.split(",") if x]
        for x in sel[name]:
            if x not in known:
                sys.exit(f"{prog}: unknown {name[:-1]} {x}; known: {', '.join(known)}")
    return sel


def interleave(workloads, fconfigs, qconfigs, applies=lambda vmm, config, workload: True):
    """Per workload, Ferry and QEMU configs alternating, so both see the same machine state: yields
    (workload, vmm, config) for those where applies(vmm, config, workload)."""
    for wl in workloads:
        f = [("ferry", c) for c in fconfigs if applies("ferry", c, wl)]
        q = [("qemu", c) for c in qconfigs if applies("qemu", c, wl)]
        order = []
        for i in range(max(len(f), len(q))):
            order += f[i:i + 1] + q[i:i + 1]
        for vmm, c in order:
            yield wl, vmm, c


def run_matrix(links, reps, plan, row_base, run_once, out_path, prefix):
    """Per link (topology up, down at the end), per rep, every item of `plan` (e.g. (workload, vmm, config)) in a
    fresh work directory: row_base(link, rep, item) gives a row's fixed fields, run_once(link, item, work) its
    measurements. One JSON line per run on stdout and appended to out_path; a run that raised or did not complete
    is reported with its error and the tails of the VMMs' logs, never dropped. Returns the rows."""
    rows = []
    out = open(out_path, "a") if out_path else None
    try:
        for link in links:
            topology_up(link)
            for rep in range(reps):
                for item in plan:
                    with tempfile.TemporaryDirectory(prefix=prefix) as work:
                        row = row_base(link, rep, item)
                        try:
                            row.update(run_once(link, item, work))
                        except Exception as e:  # a failed run is reported, never silently dropped
                            row.update({"completed": False, "converged": False, "error": f"{type(e).__name__}: {e}"})
                        keep = os.environ.get("FERRY_BENCH_KEEP_LOGS")
                        if keep:
                            os.makedirs(keep, exist_ok=True)
                            tag = "-".join(str(row.get(k, "")) for k in ("link", "workload", "vmm", "config", "rep"))
                            for f in ("src.log", "dst.log"):
                                if os.path.exists(os.path.join(work, f)):
                                    shutil.copy(os.path.join(work, f), os.path.join(keep, f"{tag}-{f}"))
                        if not row.get("completed"):
                            for f in ("src.log", "dst.log"):
                                t = read_text(os.path.join(work, f)).strip()
                                if t:
                                    row[f.replace(".", "_")] = t[-1500:]
                        print(json.dumps(row), flush=True)
                        if out:
                            out.write(json.dumps(row) + "\n")
                            out.flush()
                        rows.append(row)
            topology_down()
    finally:
        topology_down()
        if out:
            out.close()
    return rows


# ---------------------------------------------------------------- reports
def fmt(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def report_axes(groups, workloads, fconfigs, qconfigs):
    """What a report has rows of: (links, workloads, Ferry configs, QEMU configs, the most runs in a cell), each
    list holding the known items (in their order) that occur in the keys (link, workload, vmm, config) of groups."""
    def present(known, pos, vmm=None):
        return [x for x in known if any(k[pos] == x and (vmm is None or k[2] == vmm) for k in groups)]
    return (present(LINK_CAP, 0), present(workloads, 1), present(fconfigs, 3, "ferry"), present(qconfigs, 3, "qemu"),
            max((len(v) for v in groups.values()), default=0))


def qemu_best(cells, keys):
    """key -> (value, config): per metric the minimum over QEMU's cells ({config: medians with "completed"}),
    among configs with at least one completed run; (None, None) where there is none."""
    best = {}
    for key in keys:
        cands = [(m[key], c) for c, m in cells.items() if m and m["completed"] and m.get(key) is not None]
        best[key] = min(cands) if cands else (None, None)
    return best


class Checks:
    """A report's acceptance table: | check | link | value | target | met |."""

    def __init__(self, heading):
        self.lines = [f"\n{heading}\n", "| check | link | value | target | met |", "|---|---|---|---|---|"]

    def at_most(self, check, link, v, target, detail=""):
        met = "-" if v is None else ("yes" if v <= target else "**no**")
        self.lines.append(f"| {check} | {link} | {'-' if v is None else f'{v:.3f}'}{detail} | <= {target} | {met} |")

    def holds(self, check, link, ok, value, target):
        """A yes/no check (ok None: not measured)."""
        met = "-" if ok is None else ("yes" if ok else "**no**")
        self.lines.append(f"| {check} | {link} | {value} | {target} | {met} |")

    def note(self, check, link, value):
        self.lines.append(f"| {check} | {link} | {value} | - | - |")

    def text(self):
        return "\n".join(self.lines)


def plot_config_bars(png, links, workloads, bars, cell, metrics, title):
    """A grid of bar charts: a row per (link, metric), a column per workload, a bar per (vmm, config) of `bars`
    that has runs there (Ferry blue, QEMU orange, darker further down the list), hatched where no run completed.
    cell(link, workload, vmm, config): that cell's medians (with "completed") or None. metrics: (key, title,
    divisor, log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib import cm as cmaps
    nrow = len(metrics) * len(links)
    fig, axes = plt.subplots(nrow, len(workloads), figsize=(4.2 * len(workloads), 3.6 * nrow), squeeze=False)
    colors = {}
    for vmm, cmap, lo, span in (("ferry", cmaps.Blues, 0.3, 0.65), ("qemu", cmaps.Oranges, 0.35, 0.55)):
        cs = [c for v, c in bars if v == vmm]
        colors.update({(vmm, c): cmap(lo + span * i / max(1, len(cs) - 1)) for i, c in enumerate(cs)})
    for li, link in enumerate(links):
        for wi, wl in enumerate(workloads):
            here = [(v, c, cell(link, wl, v, c)) for v, c in bars]
            here = [h for h in here if h[2]]
            for mi, (key, mtitle, div, log) in enumerate(metrics):
                ax = axes[len(metrics) * li + mi][wi]
                for x, (v, c, m) in enumerate(here):
                    val = (m[key] or 0) / div
                    b = ax.bar(x, val, 0.8, color=colors[(v, c)], edgecolor="black", linewidth=0.4)[0]
                    if not m["completed"]:
                        b.set_hatch("//")
                        b.set_alpha(0.5)
                    ax.annotate(f"{val:.0f}" if abs(val) >= 10 else f"{val:.1f}", (x, val), ha="center", va="bottom",
                                fontsize=6)
                pos = [(m[key] or 0) / div for _, _, m in here if (m[key] or 0) > 0]
                if log and pos:  # from a whole decade up, so that bar heights compare
                    ax.set_yscale("log")
                    ax.set_ylim(bottom=10 ** math.floor(math.log10(min(pos)) - 0.01), top=max(pos) * 2)
                    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xticks(range(len(here)))
                ax.set_xticklabels([("F " if v == "ferry" else "Q ") + c for v, c, _ in here], rotation=60, ha="right",
                                   fontsize=7)
                ax.set_title(f"{link} / {wl}: {mtitle}", fontsize=9)
                ax.tick_params(axis="y", labelsize=7)
                if wi == 0:
                    ax.set_ylabel(mtitle, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png, dpi=90)
