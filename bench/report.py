"""What bench/run.py's results look like to people: the markdown tables and the PNG charts.
Both rest on the figures that do not depend on the scheduler's tick sampling (instructions,
system calls and CPU ns per request); the tick-sampled user/system split is an extra column."""
from __future__ import annotations

from pathlib import Path

import summary
from summary import FIGURES, HTTP_PAIRS, PAIRS, TLS_PAIRS, TOO_SHORT

FIGURE_NAMES = {"instructions": "user-space instructions per request (callgrind)",
                "syscalls": "system calls per request (perf)",
                "cpu_ns": "server CPU ns per request, user + system (schedstat)"}
SHORT = {"instructions": "instr/req", "syscalls": "syscalls/req", "cpu_ns": "CPU ns/req"}


def _num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _fig(figure: str, value) -> str:
    """instructions and ns as whole numbers, system calls with 2-3 decimals."""
    if value is None:
        return "—"
    if figure == "syscalls":
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    return f"{value:,.0f}"


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
            f"{m['kqfast']} at {m['commit'] or 'an unknown commit'}; {m['pinning']}; medians of "
            f"{c['rounds']} interleaved round(s), {c['duration']:g} s measured after "
            f"{c['warmup']:g} s of warm-up (wrk: {c['http_seconds'][1]} s after "
            f"{c['http_seconds'][0]} s), under callgrind {c['callgrind_duration']:g} s after "
            f"{c['callgrind_warmup']:g} s; load average at start "
            f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}; {m['date']}.")


def instruments_lines(results: dict) -> list[str]:
    v = results["machine"].get("versions", {})
    tools = {"callgrind": v.get("valgrind"), "perf": v.get("perf"), "schedstat": "/proc"}
    lines = []
    for name, why in results["instruments"].items():
        lines.append(f"- {name}: " + (f"used ({tools.get(name)})" if why is None else
                                      f"**not available**, its figures are left empty: {why}"))
    peers = ", ".join(f"{k} {val}" for k, val in v.items()
                      if k not in ("valgrind", "perf") and val)
    return lines + ([f"- versions: {peers}"] if peers else []) + [""]


def _status(t: dict) -> str:
    return f"**{t['status']}**" if t["status"].startswith("missed") else t["status"]


def _quantity(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ratio":
        return f"{value:.2f}×"
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "connections":
        return f"{value:,.0f}"
    return f"{value * 100:.0f}%" + (" (it got faster)" if value < 0 else "")


def targets_table(results: dict) -> list[str]:
    rows = [[t["target"], _quantity(t["value"], t["unit"]),
             f"{t['op']} {_quantity(t['limit'], t['unit'])}", _status(t)]
            for t in results["targets"]]
    return _table(["target", "measured", "limit", "verdict"], rows)


def figure_table(results: dict, figure: str) -> list[str]:
    """One figure for every echo server in every workload."""
    workloads = results["workloads"]
    header = ["server"] + [w["label"] for w in workloads.values()]
    rows = [[label] + [_fig(figure, results["load"].get(w, {}).get(key, {}).get(figure))
                       for w in workloads]
            for key, label in results["servers"].items()]
    rows += [[f"{key}: missing"] + ["—"] * len(workloads) for key in results["missing"]
             if not key.startswith("uvicorn-")]
    return _table(header, rows)


def throughput_table(results: dict) -> list[str]:
    workloads = results["workloads"]
    header = ["server"] + [w["label"] for w in workloads.values()]
    rows = [[label] + [_num(results["load"].get(w, {}).get(key, {}).get("requests_per_second"),
                            0) for w in workloads]
            for key, label in results["servers"].items()]
    return _table(header, rows)


def _unmeasured_row(label: str, m: dict | None, width: int) -> list[str]:
    """A table row for a server with nothing measured: why (its first failure), if known."""
    why = "failed: " + m["failed"][0][-120:].replace("|", "/").replace("\n", " ") \
        if m and m["failed"] else "not measured"
    return [label, why] + [""] * (width - 2)


def load_table(results: dict, workload: str) -> list[str]:
    header = ["server", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "instr/req",
              "syscalls/req", "CPU ns/req", "tick user µs/req", "tick sys µs/req",
              "server busy", "kqfast-bench µs/req", "errors"]
    rows = []
    for key, label in results["servers"].items():
        m = results["load"].get(workload, {}).get(key)
        if m is None or not (m["rounds"] or m["callgrind_rounds"]):
            rows.append(_unmeasured_row(label, m, len(header)))
            continue
        client = None if m["client_user_us"] is None else m["client_user_us"] + (
            m["client_system_us"] or 0)
        rows.append([label, _num(m["requests_per_second"], 0), _num(m["p50"], 1),
                     _num(m["p90"], 1), _num(m["p99"], 1), _num(m["p99.9"], 1),
                     _fig("instructions", m["instructions"]), _fig("syscalls", m["syscalls"]),
                     _fig("cpu_ns", m["cpu_ns"]), _num(m["tick_user_us"]),
                     _num(m["tick_system_us"]), _pct(m["server_busy"]), _num(client),
                     str(m["errors"])])
    return _table(header, rows)


def http_table(results: dict) -> list[str]:
    header = ["server", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "instr/req", "syscalls/req",
              "CPU ns/req", "server busy", "errors"]
    rows = []
    for key, label in results["http_servers"].items():
        m = results["http"].get(key)
        if m is None or not (m["rounds"] or m["callgrind_rounds"]):
            rows.append(_unmeasured_row(label, m, len(header)))
            continue
        rows.append([label, _num(m["requests_per_second"], 0), _num(m["p50"], 0),
                     _num(m["p99"], 0), _num(m["p99.9"], 0),
                     _fig("instructions", m["instructions"]), _fig("syscalls", m["syscalls"]),
                     _fig("cpu_ns", m["cpu_ns"]), _pct(m["server_busy"]), str(m["errors"])])
    rows += [[f"{key}: missing"] + ["—"] * (len(header) - 1) for key in results["missing"]
             if key.startswith("uvicorn-")]
    return _table(header, rows)


def tls_table(results: dict, workload: str) -> list[str]:
    """A TLS workload: every TLS server's figures, and OpenSSL's own share of its
    instructions (counted where OpenSSL is called through kqfast or Python's ssl module)."""
    header = ["server", "req/s", "p50 µs", "p99 µs", "instr/req", "of which OpenSSL",
              "syscalls/req", "CPU ns/req", "server busy"]
    rows = []
    for key, label in results.get("tls_servers", {}).items():
        m = results["tls"].get(workload, {}).get(key)
        if m is None or not (m["rounds"] or m["callgrind_rounds"]):
            rows.append(_unmeasured_row(label, m, len(header)))
            continue
        rows.append([label, _num(m["requests_per_second"], 0), _num(m["p50"], 0),
                     _num(m["p99"], 0), _fig("instructions", m["instructions"]),
                     _fig("instructions", m["openssl_instructions"]),
                     _fig("syscalls", m["syscalls"]), _fig("cpu_ns", m["cpu_ns"]),
                     _pct(m["server_busy"])])
    rows += [[f"{key}: missing"] + ["—"] * (len(header) - 1) for key in results["missing"]
             if key.endswith("-tls")]
    return _table(header, rows)


def ratio_table(results: dict) -> list[str]:
    header = ["workload", "pair"] + [SHORT[f] for f in FIGURES]
    rows = []
    for w, meta in results["workloads"].items():
        for key, label, _, _ in PAIRS:
            r = results["ratios"].get(w, {}).get(key, {})
            if any(v is not None for v in r.values()):
                rows.append([meta["label"], label] + [_num(r.get(f)) for f in FIGURES])
    for key, label, _, _ in HTTP_PAIRS:
        r = results["ratios"].get("http", {}).get(key, {})
        if any(v is not None for v in r.values()):
            rows.append(["uvicorn hello world (wrk)", label] + [_num(r.get(f)) for f in FIGURES])
    for w, meta in results.get("tls_workloads", {}).items():
        for key, label, _, _ in TLS_PAIRS:
            r = results["ratios"].get(w, {}).get(key, {})
            if any(v is not None for v in r.values()):
                rows.append([meta["label"], label] + [_num(r.get(f)) for f in FIGURES])
    return _table(header, rows) if rows else ["No pair was measured.", ""]


def idle_table(results: dict) -> list[str]:
    low, high = results["config"]["idle_connections"]
    header = ["server", "bytes per idle connection", f"RSS at {low:,} (MiB)",
              f"RSS at {high:,} (MiB)"]
    rows = []
    for key, label in results["servers"].items():
        m = results["idle_memory"].get(key)
        rows.append([label, "—", "", ""] if m is None else
                    [label, _num(m["bytes_per_connection"], 0), f"{m['rss'][0] / 2**20:.1f}",
                     f"{m['rss'][1] / 2**20:.1f}"])
    return _table(header, rows)


def gil_table(results: dict) -> list[str]:
    header = ["handler", "workload", "req/s, no spinner", "spinner at nice 19", "kept",
              "spinner at nice 0", "kept", "spinner's speed under load (nice 0)"]
    rows = [[{"native": "kqfast ECHO (native)", "python": "kqfast Protocol (Python)"}[r["handler"]],
             results["workloads"].get(r["workload"], {}).get("label", r["workload"]),
             _num(r["rps_none"], 0), _num(r["rps_nice"], 0), _pct(r["kept_nice"]),
             _num(r["rps_equal"], 0), _pct(r["kept_equal"]), _pct(r["spinner_speed_equal"])]
            for r in results["gil"]]
    return _table(header, rows)


def banner(results: dict) -> list[str]:
    lines = []
    if results["quick"]:
        lines += [f"**`--quick` run: its figures are {TOO_SHORT}.** Windows this short give few "
                  "requests and a skewed window edge; the targets below show what was measured "
                  "but no verdict.  Run without `--quick` to judge.", ""]
    p = results["progress"]
    if not results["complete"]:
        why = p["interrupted"] or "still running"
        lines += [f"**Incomplete: {p['measured']} of {p['planned']} measurements ({why}).**",
                  ""]
    return lines


def method_lines(results: dict) -> list[str]:
    return [
        "Each server runs alone, pinned to one CPU, its load generator pinned to the other; "
        "servers are interleaved over rounds and medians reported (ratios: medians of "
        "per-round ratios).  The server's cost is read over exactly the load generator's "
        "measured window: **user-space instructions per request** from callgrind (a pass of "
        "its own under valgrind: instrumentation switched on after start-up, counters zeroed "
        "as kqfast-bench starts measuring and dumped as it stops), **system calls per "
        "request** from `perf stat -e raw_syscalls:sys_enter -p PID`, and **CPU ns per "
        "request** (user + system) from `/proc/PID/task/*/schedstat`, summed over threads.  "
        "None of them rests on the scheduler's 10 ms tick sampling; the tick-sampled "
        "user/system split (psutil) is shown in the detail tables only.  HTTP: uvicorn + "
        "httptools hello world under `wrk -t1 -c50`; its window runs from just before wrk "
        "starts to just after it ends, so wrk's 50 connects and closes are inside it.", ""] + \
        caveat_lines(results)


def caveat_lines(results: dict) -> list[str]:
    """What the figures' own spread says, from the runs themselves."""
    import statistics
    lags = [r["cost"]["callgrind_lag_s"] for r in results["runs"]["load"]
            if r["pass"] == "callgrind" and "failed" not in r and r["cost"].get("callgrind_lag_s")
            and len(r["cost"]["callgrind_lag_s"]) == 2]
    lines = []
    if lags:
        zero = statistics.median(lag[0] for lag in lags)
        dump = statistics.median(lag[1] for lag in lags)
        window = results["config"]["callgrind_duration"]
        lines.append(
            f"- `callgrind_control -z` took {zero:.2f} s and `-d` {dump:.2f} s (medians; "
            "`callgrind_lag_s` in each run): the counted window starts and ends that much after "
            f"kqfast-bench's {window:g} s, so it may be up to {(dump - zero) / window:.0%} longer "
            "than the window the requests are counted in; about the same for every server, so "
            "ratios barely move.")
    lines.append(
        "- System calls per request depend on how many events each `epoll_wait` returns, "
        "i.e. on timing: between rounds they move by a few percent (see `runs` in "
        "results.json), more than a ±2% target's margin; instructions per request move by "
        "about 1%.")
    return lines + [""]


def markdown(results: dict) -> str:
    """results.md: a README-ready summary first, then every table the run produced."""
    lines = ["# kqfast benchmark results", ""] + banner(results)
    lines += [f"Command: `{results['command']}`", "", f"Machine: {machine_line(results)}", ""]
    lines += instruments_lines(results)
    for key, why in results["missing"].items():
        lines.append(f"- left out: {key}: {why}")
    if results.get("charts_missing"):
        lines.append(f"- no charts: {results['charts_missing']}")
    if results["missing"] or results.get("charts_missing"):
        lines.append("")
    lines += ["## Summary", ""] + method_lines(results)
    lines += ["### Targets", ""] + targets_table(results)
    for figure in FIGURES:
        lines += [f"### {FIGURE_NAMES[figure][0].upper()}{FIGURE_NAMES[figure][1:]}", ""]
        lines += figure_table(results, figure)
    if results["http_servers"] or any(k.startswith("uvicorn-") for k in results["missing"]):
        lines += ["### uvicorn + httptools hello world, wrk -t1 -c50", ""] + http_table(results)
    if results.get("tls_servers") or any(k.endswith("-tls") for k in results["missing"]):
        lines += ["### TLS echo under redis-benchmark --tls", "",
                  "Each run counts from just before redis-benchmark starts to just after it "
                  "ends: its connections' TLS 1.3 handshakes (P-256) are inside.", ""]
        for workload, w in results.get("tls_workloads", {}).items():
            lines += [f"#### {w['label']}", ""] + tls_table(results, workload)
    lines += ["### Requests per second", ""] + throughput_table(results)
    lines += ["### Ratios (medians of per-round ratios)", ""] + ratio_table(results)
    if results["parts"]["idle"]:
        lines += ["### Memory per idle connection", "",
                  "RSS growth of the server process from the first to the second count of idle "
                  "connections, divided by the difference.", ""] + idle_table(results)
    for name in results.get("charts", []):
        lines += [f"![{name}]({name})", ""]
    lines += ["## Every workload", ""]
    for workload, w in results["workloads"].items():
        lines += [f"### {w['label']}", ""] + load_table(results, workload)
    if results["parts"]["gil"]:
        lines += ["## A spinning Python thread in the server's process", "",
                  "The spinner shares the loop's CPU.  At nice 19 it holds the GIL but gets "
                  "almost no CPU time, so what it costs is the GIL's cost alone; at nice 0 it "
                  "also takes its fair half of the CPU.  \"kept\" is req/s with the spinner ÷ "
                  "without (a median of per-round ratios); over 100% happens: a CPU kept busy "
                  "never idles, so the loop's wake-ups skip the idle state's exit latency.  The "
                  "spinner's speed is its spins per second under the load ÷ alone just before "
                  "it.", ""]
        lines += gil_table(results)
    return "\n".join(lines)


# -- charts -----------------------------------------------------------------------------------

def _colour(key: str) -> str:
    return ("#d62728" if key.startswith("kqfast") or key.startswith("uvicorn-kqfast")
            else "#1f77b4" if key == "c" else "#7f7f7f")


def _panels(plt, results: dict, rows: dict, table: dict, figure: str, workloads: list,
            title: str, xlabel: str, path: Path, log: bool = False) -> bool:
    """One horizontal bar panel per workload: `figure` of every server in `rows`."""
    keys, labels = list(rows), list(rows.values())
    workloads = [w for w in workloads if any(
        (table.get(w, {}).get(k) or {}).get(figure) for k in keys)]
    if not workloads:
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(max(9.0, 4.2 * len(workloads) + 1.5),
                                                         0.4 * len(keys) + 1.8), sharey=True,
                             squeeze=False)
    for ax, w in zip(axes[0], workloads):
        values = [(table.get(w, {}).get(k) or {}).get(figure) for k in keys]
        ax.barh(labels, [v or 0 for v in values], color=[_colour(k) for k in keys])
        for i, v in enumerate(values):
            ax.text(v or 0, i, "  " + ("—" if v is None else _fig(figure, v)), va="center",
                    fontsize=7)
        if log:
            ax.set_xscale("log")
            top = max(v for v in values if v)
            ax.set_xlim(min(v for v in values if v) / 2, top * 12)
        else:
            ax.set_xlim(0, max(v or 0 for v in values) * 1.35 or 1)
        name = {**results["workloads"], **results.get("tls_workloads", {})}.get(w, {}).get(
            "label", "uvicorn hello world, wrk -c50")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title + (f"  [{TOO_SHORT}]" if results["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def charts(results: dict, out: Path) -> tuple[list[str], str]:
    """Writes the PNG charts; returns (file names, why there are none)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'kqfast[bench]')"
    written = []
    echo, workloads = results["servers"], list(results["workloads"])
    specs = [
        ("instructions_per_request.png", "instructions", "User-space instructions per request "
         "(callgrind; lower is better)", "instructions / request (log)", True),
        ("syscalls_per_request.png", "syscalls", "System calls per request (perf; lower is "
         "better)", "system calls / request", False),
        ("cpu_ns_per_request.png", "cpu_ns", "Server CPU per request, user + system "
         "(schedstat; lower is better)", "CPU ns / request", False),
        ("requests_per_second.png", "requests_per_second", "Requests per second (higher is "
         "better)", "req/s", False),
    ]
    for name, figure, title, xlabel, log in specs:
        if _panels(plt, results, echo, results["load"], figure, workloads, title, xlabel,
                   out / name, log):
            written.append(name)
    tls = results.get("tls_servers", {})
    for name, figure, title, xlabel, log in (
            ("tls_instructions_per_request.png", "instructions", "TLS echo: user-space "
             "instructions per request (callgrind; lower is better)", "instructions / request",
             False),
            ("tls_cpu_ns_per_request.png", "cpu_ns", "TLS echo: server CPU per request "
             "(schedstat; lower is better)", "CPU ns / request", False)):
        if tls and _panels(plt, results, tls, results["tls"], figure,
                           list(results.get("tls_workloads", {})), title, xlabel, out / name,
                           log):
            written.append(name)
    if results["http_servers"]:
        fig, axes = plt.subplots(1, 4, figsize=(17, 0.45 * len(results["http_servers"]) + 1.8),
                                 sharey=True)
        keys, labels = list(results["http_servers"]), list(results["http_servers"].values())
        for ax, figure, xlabel in zip(axes, ("requests_per_second", "cpu_ns", "syscalls",
                                             "instructions"),
                                      ("req/s", "CPU ns / request", "system calls / request",
                                       "instructions / request")):
            values = [(results["http"].get(k) or {}).get(figure) for k in keys]
            ax.barh(labels, [v or 0 for v in values], color=[_colour(k) for k in keys])
            for i, v in enumerate(values):
                ax.text(v or 0, i, "  " + ("—" if v is None else _fig(figure, v)), va="center",
                        fontsize=7)
            ax.set_xlim(0, max(v or 0 for v in values) * 1.4 or 1)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        axes[0].invert_yaxis()
        fig.suptitle("uvicorn + httptools hello world under wrk -t1 -c50"
                     + (f"  [{TOO_SHORT}]" if results["quick"] else ""))
        fig.tight_layout()
        fig.savefig(out / "http.png", dpi=110)
        plt.close(fig)
        written.append("http.png")
    idle = {k: (results["idle_memory"].get(k) or {}).get("bytes_per_connection") for k in echo}
    if any(v is not None for v in idle.values()):
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(echo) + 1.4))
        ax.barh(list(echo.values()), [v or 0 for v in idle.values()],
                color=[_colour(k) for k in echo])
        for i, b in enumerate(idle.values()):
            ax.text(max(b or 0, 0), i, "  —" if b is None else f"  {b:,.0f} B", va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(v or 0 for v in idle.values()) * 1.25 or 1)
        ax.set_xlabel("bytes of server RSS per idle connection (lower is better)")
        fig.tight_layout()
        fig.savefig(out / "idle_memory.png", dpi=110)
        plt.close(fig)
        written.append("idle_memory.png")
    return written, ""


def main() -> int:
    """python bench/report.py [RESULTS_JSON]: the verdicts, results.md and the charts again,
    beside it."""
    import json
    import sys

    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" /
                "results.json")
    results = json.loads(path.read_text())
    results["targets"] = summary.targets(results)
    results["charts"], results["charts_missing"] = charts(results, path.parent)
    path.write_text(json.dumps(results, indent=1) + "\n")
    (path.parent / "results.md").write_text(markdown(results))
    print(f"report.py: wrote {path.parent}/results.md"
          + "".join(f", {name}" for name in results["charts"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
