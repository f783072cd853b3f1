"""kqfast's native echo with 1 and 2 event loops (--workers), interleaved rounds, medians.

    python bench/workers.py [--rounds 3] [--duration 5]

Writes bench/results/workers.json and workers.md (--out DIR elsewhere): req/s, the server's
CPU ns per request (schedstat) and system calls per request (perf, where installed).  Nothing is pinned: two loops need both
CPUs, and so does the load generator.  On a 2-core machine this shows what a second loop
costs and whether it keeps up, not how kqfast scales: kqfast-bench takes about as much CPU
per request as the server, so the two compete for the same two cores."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import instruments
from measure import Cpus, Window, Workload, load

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOAD = Workload("ping-pong-16", "ping-pong, 16 B, 50 connections", 50, 16, 1)


def measure(rounds: int, duration: float, warmup: float) -> dict:
    """{workers: [one kqfast-bench report (with the server's CPU) per round]}."""
    runs: dict[int, list] = {1: [], 2: []}
    have = instruments.available()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for workers in runs:
                argv = (sys.executable, "-m", "kqfast.cli", "--port", "0", "--mode", "raw",
                        "--workers", str(workers))
                runs[workers].append(load(argv, WORKLOAD, duration, warmup, Cpus(None, None),
                                          Path(tmp) / f"workers-{workers}.log",
                                          window=Window("native", have, Path(tmp))))
    return runs


def summary(runs: list[dict]) -> dict:
    runs = [r for r in runs if "failed" not in r]

    def median(path):
        values = [v for v in map(path, runs) if v is not None]
        return statistics.median(values) if values else None
    return {
        "requests_per_second": median(lambda r: r["requests_per_second"]),
        "cpu_ns": median(lambda r: r["cost"]["cpu_ns_per_request"]),
        "syscalls": median(lambda r: r["cost"]["syscalls_per_request"]),
        "server_user_us": median(lambda r: r["server_cpu"]["user_us_per_request"]),
        "server_system_us": median(lambda r: r["server_cpu"]["system_us_per_request"]),
        "p99_us": median(lambda r: r["latency_us"]["p99"]),
        "errors": sum(r["errors"] for r in runs),
    }


def _n(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(table: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| workers | req/s | server CPU ns/req (schedstat) | syscalls/req (perf) | "
             "tick user µs/req | tick sys µs/req | p99 µs | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workers, row in table.items():
        lines.append(f"| {workers} | {_n(row['requests_per_second'], ',.0f')} | "
                     f"{_n(row['cpu_ns'], ',.0f')} | {_n(row['syscalls'], '.2f')} | "
                     f"{_n(row['server_user_us'], '.2f')} | "
                     f"{_n(row['server_system_us'], '.2f')} | {_n(row['p99_us'], ',.0f')} | "
                     f"{row['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = measure(args.rounds, args.duration, args.warmup)
    table = {workers: summary(reports) for workers, reports in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workers.json").write_text(json.dumps({"summary": table, "runs": runs}, indent=1))
    command = "python bench/workers.py " + " ".join(sys.argv[1:])
    (args.out / "workers.md").write_text(markdown(table, command.strip()))
    print(markdown(table, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
