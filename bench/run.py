"""The whole comparison in one command:

    python bench/run.py [--quick] [--rounds 3] [--duration 5] [--warmup 1] [--out DIR]

Servers run one at a time, interleaved over rounds (A B C ... A B C ...), each pinned to CPU 0
with kqfast-bench pinned to CPU 1; the report gives medians, and target ratios as the median of
each round's ratio (neighbours in time share the machine's noise).  Writes results.json,
results.md and PNG charts under bench/results/ (or --out)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import psutil  # noqa: F401  (servers' CPU times: without them there is nothing to report)
except ImportError:
    sys.exit("run.py needs psutil to read the servers' CPU time: pip install 'kqfast[bench]'")

import kqfast  # noqa: E402
from field import field  # noqa: E402
from measure import Cpus, Workload, gil, idle_memory, load  # noqa: E402
import report  # noqa: E402

HEADLINE = "pingpong"   # the workload the CPU targets are judged on


def workloads(quick: bool) -> list[Workload]:
    many = 200 if quick else 10000
    return [
        Workload("pingpong", "ping-pong, 16 B, 50 connections", 50, 16, 1),
        Workload("1k", "ping-pong, 1 KiB, 50 connections", 50, 1024, 1),
        Workload("pipelined", "pipelined ×16, 16 B, 50 connections", 50, 16, 16),
        Workload("latency", "ping-pong, 16 B, 1 connection", 1, 16, 1),
        Workload("c10k", f"ping-pong, 16 B, {many:,} connections", many, 16, 1),
    ]


def gil_cases(quick: bool) -> list[tuple[str, str, Workload]]:
    """(handler, spinner, workload): the native loop, and the Python handler as the control."""
    keys = ("pingpong",) if quick else ("pingpong", "latency")
    chosen = [w for w in workloads(quick) if w.key in keys]
    return [(handler, spin, workload) for handler in ("native", "python") for workload in chosen
            for spin in ("none", "nice", "equal")]


def raise_fd_limit() -> int:
    """Lifts the soft fd limit to the hard one: servers and kqfast-bench inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def cpus() -> Cpus:
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(usable) < 2:
        return Cpus(None, None)
    return Cpus(usable[0], usable[1])


def git_commit() -> str | None:
    """The commit the servers were built from, "+dirty" when the tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine(where: Cpus, fd_limit: int) -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "kqfast": f"{kqfast.__version__} ({kqfast.BACKEND})",
        "commit": git_commit(),
        "pinning": ("none (fewer than 2 CPUs)" if where.server is None else
                    f"server on CPU {where.server}, kqfast-bench on CPU {where.client}"),
        "fd_limit": fd_limit,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def median_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_load(runs: list[dict]) -> dict:
    """{workload: {server: medians}} over the rounds."""
    out: dict = {}
    for run in runs:
        out.setdefault(run["workload"], {}).setdefault(run["server"], []).append(run)
    paths = {
        "requests_per_second": ("requests_per_second",),
        "p50": ("latency_us", "p50"), "p90": ("latency_us", "p90"),
        "p99": ("latency_us", "p99"), "p99.9": ("latency_us", "p99.9"),
        "server_user_us": ("server_cpu", "user_us_per_request"),
        "server_system_us": ("server_cpu", "system_us_per_request"),
        "server_busy": ("server_cpu", "busy"),
        "client_user_us": ("client_cpu", "user_us_per_request"),
        "client_system_us": ("client_cpu", "system_us_per_request"),
        "client_busy": ("client_cpu", "busy"),
    }

    def get(run, path):
        for key in path:
            run = run.get(key) if isinstance(run, dict) else None
        return run

    for workload, by_server in out.items():
        for server, server_runs in by_server.items():
            ok = [r for r in server_runs if "failed" not in r]
            medians = {name: median_of([get(r, p) for r in ok]) for name, p in paths.items()}
            for side in ("server", "client"):
                # A run that completed no request has no CPU per request: left out.
                parts = [(get(r, (f"{side}_cpu", "user_us_per_request")),
                          get(r, (f"{side}_cpu", "system_us_per_request"))) for r in ok]
                medians[f"{side}_total_us"] = median_of(
                    [user + system for user, system in parts if None not in (user, system)])
            medians["errors"] = sum(r["errors"] for r in ok)
            medians["rounds"] = len(ok)
            medians["failed"] = [r["failed"] for r in server_runs if "failed" in r]
            by_server[server] = medians
    return out


def per_round_ratio(runs: list[dict], workload: str, a: str, b: str, value) -> float | None:
    """The median over rounds of value(a's run) / value(b's run) in the same round."""
    by_round: dict = {}
    for run in runs:
        if run["workload"] == workload and run["server"] in (a, b) and "failed" not in run:
            by_round.setdefault(run["round"], {})[run["server"]] = run
    ratios = [value(pair[a]) / value(pair[b]) for pair in by_round.values()
              if len(pair) == 2 and value(pair[b])]
    return median_of(ratios)


def user_us(run: dict) -> float:
    return run["server_cpu"]["user_us_per_request"]


def total_us(run: dict) -> float:
    return run["server_cpu"]["user_us_per_request"] + run["server_cpu"]["system_us_per_request"]


def cpu_ratios(runs: list[dict], workload_keys: list[str]) -> dict:
    """Per workload: kqfast native vs C, kqfast Protocol vs uvloop (user and total)."""
    return {w: {
        "native_vs_c_user": per_round_ratio(runs, w, "kqfast-echo", "c", user_us),
        "native_vs_c_total": per_round_ratio(runs, w, "kqfast-echo", "c", total_us),
        "python_vs_uvloop_user": per_round_ratio(runs, w, "kqfast-python", "uvloop", user_us),
        "python_vs_uvloop_total": per_round_ratio(runs, w, "kqfast-python", "uvloop", total_us),
    } for w in workload_keys}


def summarize_gil(runs: list[dict]) -> list[dict]:
    """Per handler and workload: req/s without a spinner, with one at nice 19 and at nice 0,
    each spinner's cost as the median of per-round ratios, and the spinner's own speed."""
    rows: dict = {}
    for run in runs:
        rows.setdefault((run["handler"], run["workload"]), {}).setdefault(run["round"], {})[
            run["spin"]] = run
    out = []
    for (handler, workload), by_round in rows.items():
        row = {"handler": handler, "workload": workload}
        for spin in ("none", "nice", "equal"):
            row[f"rps_{spin}"] = median_of([r[spin].get("requests_per_second")
                                            for r in by_round.values() if spin in r])
        for spin in ("nice", "equal"):
            row[f"kept_{spin}"] = median_of([
                r[spin]["requests_per_second"] / r["none"]["requests_per_second"]
                for r in by_round.values()
                if spin in r and "none" in r and r["none"].get("requests_per_second")
                and "failed" not in r[spin]])
            row[f"spinner_speed_{spin}"] = median_of([r[spin].get("spinner_speed_under_load")
                                                      for r in by_round.values() if spin in r])
        out.append(row)
    return out


def targets(results: dict) -> list[dict]:
    ratios = results["cpu_ratios"].get(HEADLINE, {})
    idle = results["idle_memory"]
    gil_rows = [r for r in results["gil"] if r["handler"] == "native" and r["workload"] == HEADLINE]
    kept = gil_rows[0]["kept_nice"] if gil_rows else None
    checks = [
        ("kqfast ECHO user CPU/request ÷ C server's", ratios.get("native_vs_c_user"), "≤", 1.3,
         "ratio"),
        ("kqfast ECHO total CPU/request ÷ C server's", ratios.get("native_vs_c_total"), "≤", 1.05,
         "ratio"),
        ("kqfast Protocol user CPU/request ÷ uvloop's", ratios.get("python_vs_uvloop_user"),
         "≤", 0.5, "ratio"),
        ("kqfast Protocol total CPU/request ÷ uvloop's", ratios.get("python_vs_uvloop_total"),
         "≤", 0.9, "ratio"),
        ("kqfast ECHO memory per idle connection",
         idle.get("kqfast-echo", {}).get("bytes_per_connection"), "≤", 64, "bytes"),
        ("kqfast Protocol memory per idle connection",
         idle.get("kqfast-python", {}).get("bytes_per_connection"), "≤", 400, "bytes"),
        ("kqfast ECHO round trips lost to a spinning Python thread (nice 19)",
         None if kept is None else 1 - kept, "<", 0.2, "fraction"),
    ]
    out = []
    for name, value, op, limit, unit in checks:
        met = None if value is None else (value <= limit if op == "≤" else value < limit)
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit,
                    "met": met})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 round, short windows, fewer connections")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds measured per run (default 5; quick: 0.3)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before each measurement (default 1; quick: 0.1)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (0.3 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 1.0)
    idle_range = (100, 200) if args.quick else (5000, 10000)
    args.out.mkdir(parents=True, exist_ok=True)

    fd_limit = raise_fd_limit()
    where = cpus()
    host = machine(where, fd_limit)  # before the runs: the load average is the machine's own
    work = tempfile.TemporaryDirectory(prefix="kqfast-bench-")
    workdir = Path(work.name)
    servers, missing = field(workdir)
    for key, why in missing.items():
        print(f"run.py: {key} left out: {why}", file=sys.stderr)
    loads = workloads(args.quick)
    log = workdir / "server.log"
    load_runs, idle_runs, gil_runs = [], [], []

    def say(text: str) -> None:
        print(f"[round {r + 1}/{rounds}] {text}", file=sys.stderr, flush=True)

    for r in range(rounds):
        for workload in loads:
            for server in servers:
                run = load(server.argv, workload, duration, warmup, where, log)
                load_runs.append({"round": r, "workload": workload.key, "server": server.key,
                                  **run})
                say(f"{workload.key:9} {server.label:28} " + (
                    f"{run['requests_per_second']:>11,.0f} req/s  server "
                    f"{run['server_cpu']['user_us_per_request']:.2f}u+"
                    f"{run['server_cpu']['system_us_per_request']:.2f}s µs/req  "
                    f"errors {run['errors']}" if "failed" not in run else
                    f"FAILED: {run['failed']}"))
        for server in servers:
            try:
                run = idle_memory(server.argv, *idle_range, where.server, log)
                say(f"idle      {server.label:28} {run['bytes_per_connection']:,.0f} B/conn")
            except (OSError, RuntimeError) as exc:
                run = {"failed": str(exc)}
                say(f"idle      {server.label:28} FAILED: {exc}")
            idle_runs.append({"round": r, "server": server.key, **run})
        for handler, spin, workload in gil_cases(args.quick):
            run = gil(handler, spin, workload, duration, warmup, where, log)
            gil_runs.append({"round": r, "handler": handler, "spin": spin,
                             "workload": workload.key, **run})
            say(f"gil       {handler:6} spin={spin:5} {workload.key:9} " + (
                f"{run['requests_per_second']:>11,.0f} req/s" if "failed" not in run else
                f"FAILED: {run['failed']}"))

    idle = {}
    for server in servers:
        ok = [run for run in idle_runs if run["server"] == server.key and "failed" not in run]
        if ok:
            idle[server.key] = {
                "bytes_per_connection": median_of([run["bytes_per_connection"] for run in ok]),
                "connections": ok[0]["connections"],
                "rss": [median_of([run["rss"][i] for run in ok]) for i in (0, 1)]}
    results = {
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "machine": host,
        "config": {"rounds": rounds, "duration": duration, "warmup": warmup,
                   "idle_connections": list(idle_range), "headline": HEADLINE},
        "servers": {s.key: s.label for s in servers},
        "missing": missing,
        "workloads": {w.key: {"label": w.label, "connections": w.connections, "size": w.size,
                              "pipeline": w.pipeline} for w in loads},
        "load": summarize_load(load_runs),
        "cpu_ratios": cpu_ratios(load_runs, [w.key for w in loads]),
        "idle_memory": idle,
        "gil": summarize_gil(gil_runs),
        "runs": {"load": load_runs, "idle_memory": idle_runs, "gil": gil_runs},
    }
    results["targets"] = targets(results)
    results["charts"], results["charts_missing"] = report.charts(results, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    print(f"run.py: wrote {args.out}/results.json, results.md"
          + "".join(f", {name}" for name in results["charts"]), file=sys.stderr)
    if results["charts_missing"]:
        print(f"run.py: no charts: {results['charts_missing']}", file=sys.stderr)
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
