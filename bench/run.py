"""The whole comparison in one command:

    python bench/run.py [--quick] [--rounds 3] [--duration 5] [--warmup 1] [--out DIR]
                        [--only KEY,...] [--workloads KEY,...] [--skip callgrind,idle,gil]
                        [--plan] [--list]

Servers run one at a time, interleaved over rounds (A B C ... A B C ...), each pinned to CPU 0
with the load generator (kqfast-bench, or wrk for HTTP) pinned to CPU 1.  Each server's cost
per request is read over exactly the load generator's measured window in figures that do not
depend on the scheduler's tick sampling: CPU ns (schedstat) and system calls (perf) in the
normal pass, user-space instructions (callgrind) in a pass of its own under valgrind.  Medians
over rounds are reported, target ratios as the median of each round's ratio.

results.json and results.md are rewritten after every measurement, the PNG charts written at
the end (and on Ctrl-C, from what was measured so far), in --out: bench/out/ by default,
which git ignores (the committed results are bench/results/: pass --out bench/results to
replace them).  --plan prints what a command would measure and about how long it would take,
and measures nothing.  The full field (the README's command, 3 rounds of 3 s) takes about an
hour; --quick takes a few minutes but judges nothing; a run of a few servers judges the
targets between them (README, "Running the bench")."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import psutil  # noqa: F401  (idle RSS and the tick-sampled CPU column)
except ImportError:
    sys.exit("run.py needs psutil: pip install 'kqfast[bench]'")

import kqfast  # noqa: E402
import instruments  # noqa: E402
import report  # noqa: E402
import summary  # noqa: E402
from field import Server, field  # noqa: E402
from measure import (Cpus, Window, Workload, gil, http_load, idle_memory, load,  # noqa: E402
                     tls_load, wrk_seconds)

PARTS = ("callgrind", "idle", "gil")
HTTP_CONNECTIONS = 50


def workloads(quick: bool) -> list[Workload]:
    many = 200 if quick else 10000
    return [
        Workload("pingpong", "ping-pong, 16 B, 50 connections", 50, 16, 1),
        Workload("1k", "ping-pong, 1 KiB, 50 connections", 50, 1024, 1),
        Workload("pipelined", "pipelined ×16, 16 B, 50 connections", 50, 16, 16),
        Workload("latency", "ping-pong, 16 B, 1 connection", 1, 16, 1),
        Workload("c10k", f"ping-pong, 16 B, {many:,} connections", many, 16, 1),
    ]


# The TLS servers' workloads (redis-benchmark --tls), each run for a number of requests: in
# the native pass REQUESTS_PER_SECOND x --duration, under callgrind TLS_CALLGRIND_REQUESTS.
def tls_workloads() -> list[Workload]:
    return [
        Workload("tls-pingpong", "TLS ping-pong, 16 B, 50 connections", 50, 16, 1),
        Workload("tls-1k", "TLS ping-pong, 1 KiB, 50 connections", 50, 1024, 1),
        Workload("tls-latency", "TLS ping-pong, 16 B, 1 connection", 1, 16, 1),
    ]


TLS_REQUESTS_PER_SECOND = 20000
TLS_CALLGRIND_REQUESTS = {"tls-pingpong": 20000, "tls-1k": 20000, "tls-latency": 5000}
CALLGRIND_WORKLOADS = ("pingpong", "1k", "pipelined", "latency", "tls-pingpong", "tls-1k",
                       "tls-latency")


def gil_cases(loads: list[Workload], quick: bool) -> list[tuple[str, str, Workload]]:
    """(handler, spinner, workload): the native loop, and the Python handler as the control."""
    keys = ("pingpong",) if quick else ("pingpong", "latency")
    chosen = [w for w in loads if w.key in keys] or loads[:1]
    return [(handler, spin, workload) for handler in ("native", "python") for workload in chosen
            for spin in ("none", "nice", "equal")]


def raise_fd_limit() -> int:
    """Lifts the soft fd limit to the hard one: servers and load generators inherit it."""
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


def _tool_version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return ((done.stdout or done.stderr).strip().splitlines() or [None])[0]


def versions() -> dict:
    out = {}
    for module in ("uvloop", "rloop", "uvicorn", "httptools", "psutil", "matplotlib"):
        try:
            out[module] = getattr(import_module(module), "__version__", "?")
        except Exception:  # noqa: BLE001  (hidden or broken: simply absent)
            out[module] = None
    out["valgrind"] = _tool_version(["valgrind", "--version"])
    out["perf"] = _tool_version(["perf", "--version"])
    wrk = _tool_version(["wrk", "-v"])
    out["wrk"] = " ".join(wrk.split()[:2]) if wrk else None
    return out


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
                    f"server on CPU {where.server}, load generator on CPU {where.client}"),
        "fd_limit": fd_limit,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "versions": versions(),
    }


@dataclass
class Phase:
    """One planned measurement and its estimated seconds (for the progress line's eta)."""
    kind: str                # load, callgrind, http, http-callgrind, idle, gil
    round: int
    server: Server | None
    workload: Workload | None
    estimate: float
    case: tuple | None = None

    @property
    def name(self) -> str:
        if self.kind == "gil":
            handler, spin, workload = self.case
            return f"gil {handler} spin={spin} {workload.key}"
        what = {"load": "", "callgrind": " [callgrind]", "http": " http",
                "http-callgrind": " http [callgrind]", "idle": " idle", "tls": "",
                "tls-callgrind": " [callgrind]"}[self.kind]
        return f"{self.server.key}{' ' + self.workload.key if self.workload else ''}{what}"


def plan(servers: list[Server], loads: list[Workload], grind: list[Workload], args,
         skip: set) -> list[Phase]:
    echo = [s for s in servers if s.kind == "echo"]
    http = [s for s in servers if s.kind == "http"]
    tls = [s for s in servers if s.kind == "tls"]
    plain_loads = [w for w in loads if not w.key.startswith("tls-")]
    tls_loads = [w for w in loads if w.key.startswith("tls-")]

    def start_s(server: Server, valgrind: bool) -> float:
        python = server.argv[0] == sys.executable
        return (4.0 if python else 0.7) if valgrind else (0.6 if python else 0.1)

    phases = []
    for r in range(args.rounds):
        for w in plain_loads:
            for s in echo:
                phases.append(Phase("load", r, s, w, start_s(s, False) + w.connections / 400
                                    + args.warmup + args.duration + 0.4))
        for w in tls_loads:
            for s in tls:
                phases.append(Phase("tls", r, s, w, start_s(s, False) + 1.1 * args.duration
                                    + 1.0))
        for s in http:
            phases.append(Phase("http", r, s, None, start_s(s, False) + 1.0 + 0.4
                                + wrk_seconds(args.warmup) + wrk_seconds(args.duration)))
        if "callgrind" not in skip:
            for w in grind:
                for s in (tls if w.key.startswith("tls-") else echo):
                    kind = "tls-callgrind" if s.kind == "tls" else "callgrind"
                    seconds = (TLS_CALLGRIND_REQUESTS[w.key] / (40000 if args.quick else 2000)
                               if s.kind == "tls" else
                               args.callgrind_warmup + args.callgrind_duration)
                    phases.append(Phase(kind, r, s, w, start_s(s, True) + 1.5 + seconds))
            for s in http:
                phases.append(Phase("http-callgrind", r, s, None, start_s(s, True) + 2.0
                                    + wrk_seconds(args.callgrind_warmup)
                                    + wrk_seconds(args.callgrind_duration)))
        if "idle" not in skip:
            for s in echo:
                phases.append(Phase("idle", r, s, None, start_s(s, False) + 1.5
                                    + args.idle[1] / 2500))
        if "gil" not in skip:
            for case in gil_cases(loads, args.quick):
                phases.append(Phase("gil", r, None, case[2], 1.0 + args.warmup + args.duration
                                    * (1 if case[1] == "none" else 2), case))
    return phases


def clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(value, digits=0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def describe(phase: Phase, run: dict) -> str:
    """The progress line's result."""
    if "failed" in run:
        return f"FAILED: {str(run['failed']).splitlines()[-1][:200] if run['failed'] else ''}"
    if phase.kind == "idle":
        return f"{run['bytes_per_connection']:,.0f} B per idle connection"
    if phase.kind == "gil":
        return f"{run['requests_per_second']:,.0f} req/s"
    s = run["cost"]
    if phase.kind in ("callgrind", "http-callgrind", "tls-callgrind"):
        return (f"{_fmt(s['instructions_per_request'])} instructions/req "
                f"(under valgrind: {run['requests']:,} requests, "
                f"{run['requests_per_second']:,.0f} req/s)")
    return (f"{run['requests_per_second']:,.0f} req/s, {_fmt(s['cpu_ns_per_request'])} CPU "
            f"ns/req, {_fmt(s['syscalls_per_request'], 2)} syscalls/req, p99 "
            f"{run['latency_us']['p99']:,.0f} µs, errors {run['errors']}")


class Runner:
    def __init__(self, args, servers, missing, have, loads, grind, skip, host, workdir):
        self.args, self.servers, self.missing, self.have = args, servers, missing, have
        self.loads, self.grind, self.skip, self.host = loads, grind, skip, host
        self.workdir = workdir
        self.log = workdir / "server.log"
        self.where = cpus()
        self.load_runs: list = []
        self.http_runs: list = []
        self.tls_runs: list = []
        self.idle_runs: list = []
        self.gil_runs: list = []
        self.done = 0
        self.interrupted = None
        self.unavailable: dict = {}

    def measure(self, phase: Phase) -> dict:
        a = self.args
        if phase.kind == "load":
            run = load(phase.server.argv, phase.workload, a.duration, a.warmup, self.where,
                       self.log, window=Window("native", self.have, self.workdir))
            self.load_runs.append({"round": phase.round, "workload": phase.workload.key,
                                   "server": phase.server.key, "pass": "native", **run})
        elif phase.kind == "callgrind":
            run = load(phase.server.argv, phase.workload, a.callgrind_duration,
                       a.callgrind_warmup, self.where, self.log,
                       window=Window("callgrind", self.have, self.workdir))
            self.load_runs.append({"round": phase.round, "workload": phase.workload.key,
                                   "server": phase.server.key, "pass": "callgrind", **run})
        elif phase.kind in ("http", "http-callgrind"):
            grind = phase.kind == "http-callgrind"
            run = http_load(phase.server.argv, HTTP_CONNECTIONS,
                            a.callgrind_duration if grind else a.duration,
                            a.callgrind_warmup if grind else a.warmup, self.where, self.log,
                            Window("callgrind" if grind else "native", self.have, self.workdir))
            self.http_runs.append({"round": phase.round, "server": phase.server.key,
                                   "pass": "callgrind" if grind else "native", **run})
        elif phase.kind in ("tls", "tls-callgrind"):
            grind = phase.kind == "tls-callgrind"
            requests = (TLS_CALLGRIND_REQUESTS[phase.workload.key] // (20 if a.quick else 1)
                        if grind else int(TLS_REQUESTS_PER_SECOND * a.duration))
            run = tls_load(phase.server.argv, phase.workload, requests, self.where, self.log,
                           Window("callgrind" if grind else "native", self.have, self.workdir,
                                  openssl=grind))
            self.tls_runs.append({"round": phase.round, "workload": phase.workload.key,
                                  "server": phase.server.key,
                                  "pass": "callgrind" if grind else "native", **run})
        elif phase.kind == "idle":
            try:
                run = idle_memory(phase.server.argv, *a.idle, self.where.server, self.log)
            except (OSError, RuntimeError) as exc:
                run = {"failed": str(exc)}
            self.idle_runs.append({"round": phase.round, "server": phase.server.key, **run})
        else:
            handler, spin, workload = phase.case
            run = gil(handler, spin, workload, a.duration, a.warmup, self.where, self.log)
            self.gil_runs.append({"round": phase.round, "handler": handler, "spin": spin,
                                  "workload": workload.key, **run})
        return run

    def results(self, planned: int) -> dict:
        a = self.args
        keys = [w.key for w in self.loads if not w.key.startswith("tls-")]
        out = {
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
            "quick": a.quick,
            "verdicts": summary.TOO_SHORT if a.quick else "judged",
            "complete": self.done == planned and self.interrupted is None,
            "progress": {"measured": self.done, "planned": planned,
                         "interrupted": self.interrupted},
            "machine": self.host,
            "config": {"rounds": a.rounds, "duration": a.duration, "warmup": a.warmup,
                       "callgrind_duration": a.callgrind_duration,
                       "callgrind_warmup": a.callgrind_warmup,
                       "callgrind_workloads": [w.key for w in self.grind],
                       "http_connections": HTTP_CONNECTIONS,
                       "http_seconds": [wrk_seconds(a.warmup), wrk_seconds(a.duration)],
                       "idle_connections": list(a.idle), "headline": summary.HEADLINE},
            "parts": {part: part not in self.skip for part in PARTS},
            "instruments": self.have,
            "servers": {s.key: s.label for s in self.servers if s.kind == "echo"},
            "http_servers": {s.key: s.label for s in self.servers if s.kind == "http"},
            "tls_servers": {s.key: s.label for s in self.servers if s.kind == "tls"},
            "missing": self.missing,
            "unavailable": self.unavailable,
            "workloads": {w.key: {"label": w.label, "connections": w.connections, "size": w.size,
                                  "pipeline": w.pipeline} for w in self.loads
                          if not w.key.startswith("tls-")},
            "tls_workloads": {w.key: {"label": w.label, "connections": w.connections,
                                      "size": w.size} for w in self.loads
                              if w.key.startswith("tls-")},
            "load": summary.summarize(self.load_runs, "workload"),
            "http": summary.summarize(self.http_runs, "workload").get("http", {}),
            "tls": summary.summarize(self.tls_runs, "workload"),
            "ratios": summary.ratios(self.load_runs, self.http_runs, keys, self.tls_runs),
            "idle_memory": summary.summarize_idle(self.idle_runs, [s.key for s in self.servers]),
            "gil": summary.summarize_gil(self.gil_runs),
            "runs": {"load": self.load_runs, "http": self.http_runs, "tls": self.tls_runs,
                     "idle_memory": self.idle_runs, "gil": self.gil_runs},
        }
        out["targets"] = summary.targets(out)
        return out

    def write_json(self, planned: int) -> dict:
        results = self.results(planned)
        path = self.args.out / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)
        return results

    def write_markdown(self, results: dict) -> None:
        """results.md as measured so far (the charts come at the end)."""
        (self.args.out / "results.md").write_text(report.markdown(
            {**results, "charts": [], "charts_missing": "written at the end of the run"}))

    def finish(self, planned: int) -> None:
        results = self.results(planned)
        results["charts"], results["charts_missing"] = report.charts(results, self.args.out)
        (self.args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (self.args.out / "results.md").write_text(report.markdown(results))
        print(f"run.py: wrote {self.args.out}/results.json, results.md"
              + "".join(f", {name}" for name in results["charts"]), file=sys.stderr)
        if results["charts_missing"]:
            print(f"run.py: no charts: {results['charts_missing']}", file=sys.stderr)
        if results["quick"]:
            print(f"run.py: --quick: {summary.TOO_SHORT}; no verdicts", file=sys.stderr)
        else:
            for t in results["targets"]:
                print(f"run.py: {t['status']:>8}: {t['target']}", file=sys.stderr)


def parse_args():
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 round, short windows, fewer connections; its "
                             "report says it is too short to judge and gives no verdicts")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds measured per run (default 5; quick: 0.3); wrk rounds to "
                             "whole seconds, at least 1")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before each measurement (default 1; quick: 0.1)")
    parser.add_argument("--callgrind-duration", type=float, default=None,
                        help="seconds measured under callgrind, ~50x slower (default 2; "
                             "quick: 0.5)")
    parser.add_argument("--callgrind-warmup", type=float, default=None,
                        help="seconds of load under callgrind before counting (default 1; "
                             "quick: 0.3)")
    parser.add_argument("--only", default=None,
                        help="comma-separated server keys to run (default: all; see --list)")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated workload keys (default: "
                             + ",".join(w.key for w in workloads(False)) + ")")
    parser.add_argument("--callgrind-workloads", default=",".join(CALLGRIND_WORKLOADS),
                        help="workloads also counted under callgrind (default: %(default)s)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to leave out: " + ",".join(PARTS))
    parser.add_argument("--list", action="store_true", help="list the servers and exit")
    parser.add_argument("--plan", action="store_true",
                        help="print the measurements and the time they would take, and exit")
    parser.add_argument("--out", type=Path, default=HERE / "out",
                        help="where results go (default bench/out/, ignored by git; the "
                             "committed ones are in bench/results/)")
    args = parser.parse_args()
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.duration = args.duration or (0.3 if q else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.1 if q else 1.0)
    args.callgrind_duration = args.callgrind_duration or (0.5 if q else 2.0)
    args.callgrind_warmup = (args.callgrind_warmup if args.callgrind_warmup is not None else
                             (0.3 if q else 1.0))
    args.idle = (100, 200) if q else (5000, 10000)
    return parser, args


def _keys(text: str | None) -> list[str] | None:
    return None if text is None else [k.strip() for k in text.split(",") if k.strip()]


def main() -> int:
    parser, args = parse_args()
    skip = set(_keys(args.skip))
    if skip - set(PARTS):
        parser.error(f"--skip takes {', '.join(PARTS)}; not {', '.join(sorted(skip - set(PARTS)))}")
    fd_limit = raise_fd_limit()
    work = tempfile.TemporaryDirectory(prefix="kqfast-bench-")
    workdir = Path(work.name)
    servers, missing = field(workdir)
    unavailable = dict(missing)  # every server missing here, selected or not: for the targets
    if args.list:
        for s in servers:
            print(f"{s.key:22} {s.kind:5} {s.label}")
        for key, why in missing.items():
            print(f"{key:22} missing: {why}")
        return 0
    only = _keys(args.only)
    if only is not None:
        unknown = set(only) - {s.key for s in servers} - set(missing)
        if unknown:
            parser.error(f"--only: no server {', '.join(sorted(unknown))} (see --list)")
        servers = [s for s in servers if s.key in only]
        missing = {k: why for k, why in missing.items() if k in only}
    every = workloads(args.quick) + tls_workloads()
    wanted = _keys(args.workloads) or [w.key for w in every]
    grind_wanted = _keys(args.callgrind_workloads) or []
    bad = (set(wanted) | set(grind_wanted)) - {w.key for w in every}
    if bad:
        parser.error(f"no workload {', '.join(sorted(bad))}")
    loads = [w for w in every if w.key in wanted]
    grind = [w for w in loads if w.key in grind_wanted]

    have = instruments.available()
    if "callgrind" in skip:
        have["callgrind"] = "skipped (--skip callgrind)"
    for key, why in missing.items():
        print(f"run.py: {key} left out: {why}", file=sys.stderr)
    for name, why in have.items():
        if why is not None:
            print(f"run.py: no {name} figures: {why}", file=sys.stderr)
    if have["callgrind"] is not None:
        skip.add("callgrind")
    where = cpus()
    host = machine(where, fd_limit)  # before the runs: the load average is the machine's own
    phases = plan(servers, loads, grind, args, skip)
    planned = len(phases)
    total = sum(p.estimate for p in phases)
    if args.plan:
        for phase in phases:
            print(f"{phase.name} round {phase.round + 1}: about {clock(phase.estimate)}")
        print(f"run.py: {planned} measurements over {args.rounds} round(s), about "
              f"{clock(total)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"run.py: {planned} measurements over {args.rounds} round(s), about {clock(total)}; "
          f"results.json and results.md are rewritten after each one, in {args.out}", file=sys.stderr,
          flush=True)
    runner = Runner(args, servers, missing, have, loads, grind, skip, host, workdir)
    runner.unavailable = unavailable
    started = time.monotonic()
    spent = 0.0
    stop = []

    def on_sigint(signum, frame):
        # Remembered as well as raised: a KeyboardInterrupt raised inside a callback (an
        # at-fork handler, a __del__) is printed and dropped by Python.
        stop.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    lists = (runner.load_runs, runner.http_runs, runner.tls_runs, runner.idle_runs,
             runner.gil_runs)
    try:
        for i, phase in enumerate(phases):
            lengths = [len(runs) for runs in lists]
            try:
                run = runner.measure(phase)
            finally:
                if stop:  # the measurement the Ctrl-C broke into is not one
                    for runs, n in zip(lists, lengths):
                        del runs[n:]
            if stop:
                raise KeyboardInterrupt
            runner.done = i + 1
            spent += phase.estimate
            elapsed = time.monotonic() - started
            rest = sum(p.estimate for p in phases[i + 1:]) * (elapsed / spent if spent else 1)
            runner.write_markdown(runner.write_json(planned))
            print(f"[{i + 1}/{planned}] {phase.name} round {phase.round + 1}/{args.rounds}: "
                  f"{describe(phase, run)} (eta {clock(rest)})", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        runner.interrupted = f"Ctrl-C after {runner.done} of {planned} measurements"
        print(f"run.py: interrupted: {runner.interrupted}; writing what was measured",
              file=sys.stderr, flush=True)
    runner.finish(planned)
    work.cleanup()
    return 130 if runner.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
