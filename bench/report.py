"""What bench/run.py's results look like to people: the markdown tables and the PNG charts."""
from __future__ import annotations

from pathlib import Path

SPIN_NAMES = {"none": "no spinner", "nice": "spinner at nice 19", "equal": "spinner at nice 0"}


def _num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _pct(value) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def machine_line(results: dict) -> str:
    m, c = results["machine"], results["config"]
    return (f"{m['cpu']}, {m['cpus']} CPUs, {m['os']}, Python {m['python']}, kqfast "
            f"{m['kqfast']} at {m['commit'] or 'an unknown commit'}; {m['pinning']}; medians of {c['rounds']} interleaved round(s), "
            f"{c['duration']:g} s measured after {c['warmup']:g} s of warm-up; load average at "
            f"start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}; {m['date']}.")


def load_table(results: dict, workload: str, compact: bool = False) -> list[str]:
    header = ["server", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs",
              "server user µs/req", "server sys µs/req", "server total µs/req"]
    if not compact:
        header += ["server busy", "kqfast-bench µs/req", "kqfast-bench busy", "errors"]
    rows = []
    for key, label in results["servers"].items():
        m = results["load"].get(workload, {}).get(key)
        if m is None or not m["rounds"]:
            rows.append([label] + ["failed"] + [""] * (len(header) - 2))
            continue
        row = [label, _num(m["requests_per_second"], 0), _num(m["p50"], 1), _num(m["p90"], 1),
               _num(m["p99"], 1), _num(m["p99.9"], 1), _num(m["server_user_us"]),
               _num(m["server_system_us"]), _num(m["server_total_us"])]
        if not compact:
            row += [_pct(m["server_busy"]), _num(m["client_total_us"]), _pct(m["client_busy"]),
                    str(m["errors"])]
        rows.append(row)
    return _table(header, rows)


def throughput_table(results: dict) -> list[str]:
    """req/s of every server in every workload, side by side."""
    workloads = results["workloads"]
    header = ["server"] + [w["label"] for w in workloads.values()]
    rows = [[label] + [_num(results["load"].get(w, {}).get(key, {}).get("requests_per_second"),
                            0) for w in workloads]
            for key, label in results["servers"].items()]
    return _table(header, rows)


def ratio_table(results: dict) -> list[str]:
    header = ["workload", "ECHO ÷ C, user", "ECHO ÷ C, total", "Protocol ÷ uvloop, user",
              "Protocol ÷ uvloop, total"]
    rows = [[results["workloads"][w]["label"]] +
            [_num(r[k]) for k in ("native_vs_c_user", "native_vs_c_total",
                                  "python_vs_uvloop_user", "python_vs_uvloop_total")]
            for w, r in results["cpu_ratios"].items()]
    return _table(header, rows)


def idle_table(results: dict) -> list[str]:
    low, high = results["config"]["idle_connections"]
    header = ["server", "bytes per idle connection", f"RSS at {low:,} (MiB)",
              f"RSS at {high:,} (MiB)"]
    rows = []
    for key, label in results["servers"].items():
        m = results["idle_memory"].get(key)
        rows.append([label, "failed", "", ""] if m is None else
                    [label, _num(m["bytes_per_connection"], 0), f"{m['rss'][0] / 2**20:.1f}",
                     f"{m['rss'][1] / 2**20:.1f}"])
    return _table(header, rows)


def gil_table(results: dict) -> list[str]:
    header = ["handler", "workload", "req/s, no spinner", "spinner at nice 19", "kept",
              "spinner at nice 0", "kept", "spinner's speed under load (nice 0)"]
    rows = [[{"native": "kqfast ECHO (native)", "python": "kqfast Protocol (Python)"}[r["handler"]],
             results["workloads"][r["workload"]]["label"], _num(r["rps_none"], 0),
             _num(r["rps_nice"], 0), _pct(r["kept_nice"]), _num(r["rps_equal"], 0),
             _pct(r["kept_equal"]), _pct(r["spinner_speed_equal"])]
            for r in results["gil"]]
    return _table(header, rows)


def _quantity(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ratio":
        return f"{value:.2f}×"
    if unit == "bytes":
        return f"{value:,.0f} B"
    return f"{value * 100:.0f}%" + (" (it got faster)" if value < 0 else "")


def targets_table(results: dict) -> list[str]:
    rows = []
    for t in results["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        rows.append([t["target"], _quantity(t["value"], t["unit"]),
                     f"{t['op']} {_quantity(t['limit'], t['unit'])}", verdict])
    return _table(["target", "measured", "limit", ""], rows)


def markdown(results: dict) -> str:
    """results.md: every table the run produced."""
    lines = ["# kqfast benchmark results", "",
             f"Command: `{results['command']}`", "", f"Machine: {machine_line(results)}", ""]
    for key, why in results["missing"].items():
        lines.append(f"- left out: {key}: {why}")
    if results["charts_missing"]:
        lines.append(f"- no charts: {results['charts_missing']}")
    if results["missing"] or results["charts_missing"]:
        lines.append("")
    headline = results["config"]["headline"]
    lines += [f"## Targets ({results['workloads'][headline]['label']}; ratios are medians of "
              "per-round ratios)", ""] + targets_table(results)
    lines += ["## Requests per second", ""] + throughput_table(results)
    for workload, w in results["workloads"].items():
        lines += [f"## {w['label']}", ""] + load_table(results, workload)
    lines += ["## CPU per request, ratios by workload", ""] + ratio_table(results)
    lines += ["## Memory per idle connection", "",
              "RSS growth of the server process from the first to the second count of idle "
              "connections, divided by the difference.", ""] + idle_table(results)
    lines += ["## A spinning Python thread in the server's process", "",
              "The spinner shares the loop's CPU.  At nice 19 it holds the GIL but gets almost "
              "no CPU time, so what it costs is the GIL's cost alone; at nice 0 it also takes "
              "its fair half of the CPU.  \"kept\" is req/s with the spinner ÷ without (a "
              "median of per-round ratios); over 100% happens: a CPU kept busy never idles, so "
              "the loop's wake-ups skip the idle state's exit latency.  The spinner's speed is "
              "its spins per second under the load ÷ alone just before it.", ""]
    lines += gil_table(results)
    for name in results["charts"]:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def charts(results: dict, out: Path) -> tuple[list[str], str]:
    """Writes the PNG charts; returns (file names, why there are none)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'kqfast[bench]')"
    labels = list(results["servers"].values())
    keys = list(results["servers"])
    written = []

    headline = results["config"]["headline"]
    load = results["load"].get(headline, {})
    user = [load.get(k, {}).get("server_user_us") or 0 for k in keys]
    system = [load.get(k, {}).get("server_system_us") or 0 for k in keys]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(keys) + 1.6))
    ax.barh(labels, user, color="#d62728", label="user (the server's own code)")
    ax.barh(labels, system, left=user, color="#9ecae1", label="system (the kernel's TCP work)")
    for i, (u, s) in enumerate(zip(user, system)):
        ax.text(u + s, i, f"  {u:.2f} + {s:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("server CPU µs per request (lower is better)")
    ax.set_title(f"Server CPU per request: {results['workloads'][headline]['label']}")
    ax.set_xlim(0, max(u + s for u, s in zip(user, system)) * 1.3 or 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cpu_per_request.png", dpi=110)
    plt.close(fig)
    written.append("cpu_per_request.png")

    workloads = results["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 0.4 * len(keys) + 1.8),
                             sharey=True)
    for ax, (w, meta) in zip(axes, workloads.items()):
        rps = [results["load"].get(w, {}).get(k, {}).get("requests_per_second") or 0
               for k in keys]
        ax.barh(labels, rps, color=["#d62728" if k.startswith("kqfast") else "#7f7f7f"
                                    for k in keys])
        ax.set_title(meta["label"], fontsize=9)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
    axes[0].invert_yaxis()
    fig.suptitle("Requests per second (higher is better)")
    fig.tight_layout()
    fig.savefig(out / "requests_per_second.png", dpi=110)
    plt.close(fig)
    written.append("requests_per_second.png")

    idle = [results["idle_memory"].get(k, {}).get("bytes_per_connection") or 0 for k in keys]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(keys) + 1.4))
    ax.barh(labels, idle, color=["#d62728" if k.startswith("kqfast") else "#7f7f7f"
                                 for k in keys])
    for i, b in enumerate(idle):
        ax.text(max(b, 0), i, f"  {b:,.0f} B", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(idle) * 1.25 or 1)
    ax.set_xlabel("bytes of server RSS per idle connection (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "idle_memory.png", dpi=110)
    plt.close(fig)
    written.append("idle_memory.png")
    return written, ""
