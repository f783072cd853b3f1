"""The oracle: CPython's whole test_asyncio package, run on asyncio's own loop and on
kqfast.Loop (asyncio's default loop factory swapped by sitecustomize.py), module by module in
subprocesses; prints each run's totals and every test that fails only on kqfast's loop.

    python tests/asyncio_oracle/run.py [--loop both|kqfast|asyncio] [-j 2] [--timeout 300]
                                       [--out DIR] [module ...]

Run it with the interpreter to test, in an environment where kqfast is installed.  Exit status
1 when a test fails (or a module hangs) on kqfast's loop only."""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAILED = ("fail", "error", "hang", "crash")
KQFAST_LOOP = "kqfast.loop.Loop"  # what sitecustomize.py makes asyncio's loop factory


def modules() -> list[str]:
    import test.test_asyncio as package
    return sorted(f"test.test_asyncio.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                  if m.name.startswith("test_"))


def run_module(module: str, loop: str, out: Path, timeout: float) -> dict[str, str]:
    """{test id: outcome} for one module on one loop."""
    env = dict(os.environ)
    if loop == "kqfast":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    path = out / f"{loop}-{module}.jsonl"
    try:
        proc = subprocess.run([sys.executable, str(HERE / "driver.py"), module, str(path)],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout, text=True)
        ended = "crash" if proc.returncode != 0 else None
        if ended:
            print(f"{module} crashed on {loop}'s loop: {proc.stderr.strip()[-2000:]}",
                  file=sys.stderr)
    except subprocess.TimeoutExpired:
        ended = "hang"
    outcomes: dict[str, str] = {}
    last = None
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "loop" in row:
            if (row["loop"] == KQFAST_LOOP) != (loop == "kqfast"):
                # Whatever passed there says nothing about the loop it was meant for.
                print(f"{module}: meant for {loop}'s loop, ran on {row['loop']}",
                      file=sys.stderr)
                return {module: "crash"}
            continue
        last = row["test"]
        if row["outcome"] == "started":
            outcomes.setdefault(last, "started")
        elif outcomes.get(last) in (None, "started", "ok", "skip"):
            outcomes[last] = row["outcome"]
    if ended is not None:
        # The test that started last never finished (or the process died in it).
        outcomes[last if last is not None else module] = ended
    return {test: ("hang" if outcome == "started" else outcome)
            for test, outcome in outcomes.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="test.test_asyncio.test_x modules (all)")
    parser.add_argument("--loop", choices=("both", "kqfast", "asyncio"), default="both")
    parser.add_argument("-j", type=int, default=2, help="modules run at once (2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per module (300)")
    parser.add_argument("--out", type=Path, help="where the per-test JSON lines go (a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="asyncio-oracle-"))
    out.mkdir(parents=True, exist_ok=True)
    loops = ("asyncio", "kqfast") if args.loop == "both" else (args.loop,)
    names = args.modules or modules()
    results: dict[str, dict[str, str]] = {loop: {} for loop in loops}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
        jobs = {pool.submit(run_module, m, loop, out, args.timeout): (m, loop)
                for m in names for loop in loops}
        for job in concurrent.futures.as_completed(jobs):
            module, loop = jobs[job]
            results[loop].update(job.result())
    print(f"Python {sys.version.split()[0]}, {len(names)} modules, "
          f"{time.monotonic() - started:.0f} s, results in {out}")
    for loop in loops:
        counts: dict[str, int] = {}
        for outcome in results[loop].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print(f"  {loop:8} {len(results[loop])} tests: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    only = []
    if len(loops) == 2:
        only = sorted(t for t, o in results["kqfast"].items()
                      if o in FAILED and results["asyncio"].get(t) not in FAILED)
        also = sorted(t for t, o in results["kqfast"].items()
                      if o in FAILED and results["asyncio"].get(t) in FAILED)
        print(f"  failing on both loops: {len(also)}")
        print(f"  failing only on kqfast.Loop: {len(only)}")
        for test in only:
            print(f"    {results['kqfast'][test]:5} {test}")
    return 1 if only else 0


if __name__ == "__main__":
    sys.exit(main())
