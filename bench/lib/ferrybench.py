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
one Ferry (`ferry migrate --json`) or QEMU (QMP `migrate`, cancelled after a timeout) migration, and
small helpers (/proc CPU time, waiting for console text, medians).
"""
import json, os, re, signal, socket, statistics, subprocess, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "build/bin")
IMAGE = os.path.join(ROOT, "build/guest/Image")
INITRD = os.path.join(ROOT, "build/guest/initramfs.cpio")
NS_A, NS_B = "fmq-a", "fmq-b"
GUEST_IP, MAC = "10.77.0.2", "52:54:00:4d:51:01"
PORT = 7400  # migration port on the destination


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
                       "--console", "stdio" if console_input else f"file:{con}", *extra]
    v = Vmm(argv, con, os.path.join(work, "src.log"), console_input)
    v.api_socket = sock
    return v


def start_ferry_dest(work, link, console_input=False):
    con = os.path.join(work, "ferry-dst.console")
    argv = ns(dest_ns(link)) + [os.path.join(BIN, "ferry-vmm"), "--incoming", f"tcp:{dest_ip(link)}:{PORT}",
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


def guest_meminfo(vmm, timeout=10):
    """Types `status` on the guest console and returns the guest's meminfo line as a dict of kB values
    (total_kb, free_kb, available_kb, used_kb), or None. Needs console_input."""
    start = len(read_text(vmm.console))
    vmm.send("status")
    pat = r"meminfo total_kb=(-?\d+) free_kb=(-?\d+) available_kb=(-?\d+) used_kb=(-?\d+)"
    if not wait_file(vmm.console, pat, timeout, start):
        return None
    m = re.findall(pat, read_text(vmm.console)[start:])[-1]
    return dict(zip(("total_kb", "free_kb", "available_kb", "used_kb"), map(int, m)))


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
                        f"tcp:{dest_ip(link)}:{PORT}", *migrate_args, "--json", "--no-progress", "--keep-source"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(src.pid) - cpu0
    try:
        st = json.loads(r.stdout)
    except ValueError:
        st = {"status": "error", "error": (r.stderr or r.stdout).strip()[-2000:]}
    return st, r.returncode, wall, cpu


def qemu_migrate(qs, src, link, timeout_s):
    """QMP migrate on the source; polls query-migrate; cancels after timeout_s. Returns (last info,
    cancelled, wall seconds, source CPU seconds, dirty-pages-rate seen last while active)."""
    cpu0, t0 = cpu_seconds(src.pid), time.monotonic()
    qs.cmd("migrate", uri=f"tcp:{dest_ip(link)}:{PORT}")
    info, cancelled, last_rate = {}, False, None
    while True:
        info = qs.cmd("query-migrate")
        if info.get("status") == "active" and info.get("ram", {}).get("dirty-pages-rate"):
            last_rate = info["ram"]["dirty-pages-rate"]
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() - t0 > timeout_s and not cancelled:
            qs.cmd("migrate_cancel")
            cancelled = True
        time.sleep(0.02)
    wall = time.monotonic() - t0
    return info, cancelled, wall, cpu_seconds(src.pid) - cpu0, last_rate
