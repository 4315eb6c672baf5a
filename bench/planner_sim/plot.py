"""Plots one planner_sim --series CSV: CPU imbalance and overload, hot hosts, migrations."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, png):
    rows = list(csv.DictReader(open(src)))
    t = [float(r["t_s"]) / 3600 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    ax[0].plot(t, [float(r["cpu_stddev"]) for r in rows], lw=0.8)
    ax[0].set_ylabel("CPU load\nstd dev")
    ax[1].plot(t, [float(r["cpu_overload_cpus"]) for r in rows], lw=0.8, color="tab:red")
    ax[1].set_ylabel("CPUs above\n75% (sum)")
    ax[2].plot(t, [int(r["hot_hosts"]) for r in rows], lw=0.8, color="tab:orange")
    ax[2].set_ylabel("hosts\nabove 75%")
    started = [int(r["migrations_started"]) for r in rows]
    per_10min, acc, out_t = [], 0, []
    step = max(1, int(600 / max(1e-9, (float(rows[1]["t_s"]) - float(rows[0]["t_s"])))) if len(rows) > 1 else 1)
    for i, n in enumerate(started):
        acc += n
        if (i + 1) % step == 0:
            per_10min.append(acc)
            out_t.append(t[i - step + 1])
            acc = 0
    ax[3].bar(out_t, per_10min, width=600 / 3600 * 0.9, align="edge", color="tab:green")
    ax[3].set_ylabel("migrations\nper 10 min")
    ax[3].set_xlabel("simulated hours")
    fig.suptitle("Ferry planner: 1,000 hosts, 20,000 VMs (bench/planner_sim)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
