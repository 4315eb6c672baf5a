#!/usr/bin/env python3
"""Records per-VM usage traces for the planner simulation from real ferry-agents.

Polls every agent's GET /v1/vms once per --interval seconds for --seconds and writes one CSV row per
VM and sample: t_s, host, vm, cpus, net_bytes_per_s, dirty_bytes_per_s, mem_bytes (the agent's own
measurements: /proc CPU time of the VMM, TAP counters, the VMM's dirty-page count). Point it at a
real cluster's agents (--agent URL, repeatable; https with --tls-cert/--tls-key/--tls-ca) to record
its usage, or let it make its own (--local): it starts an agent on loopback with a mix of guests and
changes what they do on a seeded schedule while it records:
  batch   cpubench (a CPU-bound job), paused and resumed in phases of 20-90 s
  cache   memdirty over 32 MiB at 3,000 pages/s (a steady writer)
  bursty  memdirty over 16 MiB as fast as it can, paused and resumed in phases of 10-60 s
  mixed   cpubench at nice 10 beside memdirty at 500 pages/s
  idle    the guest's kernel and init only
  boot    deleted and created again every 60-180 s (boot spikes, then idle)
The sim replays such a file with --traces (bench/planner_sim/planner_sim.cc).
Usage: bench/planner_sim/record.py --local --seconds 600 --out FILE.csv
       bench/planner_sim/record.py --agent https://a:7101 --agent https://b:7101 --tls-... --out FILE.csv
"""
import argparse
import csv
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOCAL_VMS = {
    "batch": "cpubench:every_ms=1000",
    "cache": "memdirty:mib=32,rate=3000,bytes=4096,verify=0",
    "bursty": "memdirty:mib=16,rate=max,bytes=4096,verify=0",
    "mixed": "cpubench:every_ms=1000,nice=10;memdirty:mib=16,rate=500,bytes=4096,verify=0",
    "idle": "",
    "boot": "",
}


class Agent:
    def __init__(self, url, ctx):
        self.url = url.rstrip("/")
        self.ctx = ctx

    def call(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ctx) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_body(name, run):
    cmdline = "console=ttyS0" + (f" ferry.run={run}" if run else "")
    return {"name": name, "kernel": f"{ROOT}/build/guest/Image", "initrd": f"{ROOT}/build/guest/initramfs.cpio",
            "mem": "128M", "cmdline": cmdline}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agent", action="append", default=[], help="an agent's base URL (repeatable)")
    ap.add_argument("--local", action="store_true", help="start an agent on loopback with the guest mix above")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--tls-ca")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not a.agent and not a.local:
        ap.error("give --agent URL or --local")
    ctx = None
    if a.tls_ca:
        ctx = ssl.create_default_context(cafile=a.tls_ca)
        if a.tls_cert:
            ctx.load_cert_chain(a.tls_cert, a.tls_key)
    agents = [Agent(u, ctx) for u in a.agent]
    proc, state = None, None
    rng = random.Random(a.seed)
    schedule = {}  # vm -> (next change time, paused)
    try:
        if a.local:
            state = tempfile.mkdtemp(prefix="ferry-record-")
            port = free_port()
            proc = subprocess.Popen([f"{ROOT}/build/bin/ferry-agent", "--listen", f"127.0.0.1:{port}", "--name", "rec",
                                     "--state-dir", state, "--capacity", "cpus=2,mem=2G", "--cpu-usage", "vms",
                                     "--sample-ms", "1000", "--insecure"],
                                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(state, "agent.log"), "w"), start_new_session=True)
            local = Agent(f"http://127.0.0.1:{port}", None)
            for _ in range(100):
                try:
                    if local.call("GET", "/v1/host", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            for name, run in LOCAL_VMS.items():
                st, body = local.call("POST", "/v1/vms", vm_body(name, run))
                if st != 201:
                    sys.exit(f"record: creating {name}: {st} {body}")
            for name, lo, hi in (("batch", 20, 90), ("bursty", 10, 60), ("boot", 60, 180)):
                schedule[name] = [rng.uniform(lo, hi), False, lo, hi]
            agents.append(local)
        t0 = time.monotonic()
        rows = 0
        with open(a.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "host", "vm", "cpus", "net_bytes_per_s", "dirty_bytes_per_s", "mem_bytes"])
            while (t := time.monotonic() - t0) < a.seconds:
                for ag in agents:
                    st, host = ag.call("GET", "/v1/host")
                    st2, vms = ag.call("GET", "/v1/vms")
                    if st != 200 or st2 != 200:
                        print(f"record: {ag.url}: {st} {st2}", file=sys.stderr)
                        continue
                    for v in vms:
                        if v.get("state") not in ("running", "paused", "migrating"):
                            continue
                        u = v.get("usage", {})
                        w.writerow([f"{t:.1f}", host.get("name", ag.url), v["name"], f"{u.get('cpus', 0):.4f}",
                                    f"{u.get('net_rx_bytes_per_s', 0) + u.get('net_tx_bytes_per_s', 0):.0f}",
                                    f"{u.get('dirty_bytes_per_s', 0):.0f}", v.get("mem_bytes", 0)])
                        rows += 1
                f.flush()
                for name, s in schedule.items():
                    if t < s[0]:
                        continue
                    if name == "boot":
                        local.call("DELETE", "/v1/vms/boot")
                        local.call("POST", "/v1/vms", vm_body("boot", ""))
                    else:
                        s[1] = not s[1]
                        local.call("PUT", f"/v1/vms/{name}/api/vm/{'pause' if s[1] else 'resume'}", {})
                    s[0] = t + rng.uniform(s[2], s[3])
                time.sleep(max(0.0, a.interval - (time.monotonic() - t0 - t)))
        print(json.dumps({"bench": "planner_sim_record", "out": a.out, "seconds": a.seconds, "rows": rows,
                          "agents": [ag.url for ag in agents]}))
    finally:
        if proc:
            for name in LOCAL_VMS:
                try:
                    local.call("DELETE", f"/v1/vms/{name}", timeout=10)
                except OSError:
                    pass
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        if state:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
