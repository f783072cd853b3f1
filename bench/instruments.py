"""The server's cost over a measured window, in figures that do not rest on the scheduler's
10 ms tick sampling:

- CPU nanoseconds, user and system together: the first field of every
  /proc/PID/task/*/schedstat (the scheduler's own run-time clock), summed over the threads;
- system calls: `perf stat -e raw_syscalls:sys_enter -p PID` (a tracepoint: these machines
  expose no hardware counters), started disabled and switched on and off through perf's
  control FIFO at the window's edges, so perf's own start-up is outside the window;
- user-space instructions: the server runs under `valgrind --tool=callgrind` with
  instrumentation off until it is ready (start-up runs ~5x slower instead of ~50x), switched
  on before the warm-up, counters zeroed as the window opens (`callgrind_control -z`) and
  dumped as it closes (`callgrind_control -d`); the dump's `summary:` line is the count.

Each instrument is an object with start() and stop() -> the count over the window (None when
it could not count).  `available()` says which of them work on this machine, and why not."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PERF_EVENT = "raw_syscalls:sys_enter"


def available() -> dict[str, str | None]:
    """{instrument: None when it works here, else why not}."""
    return {"schedstat": _schedstat_missing(), "perf": _perf_missing(),
            "callgrind": _callgrind_missing()}


def _schedstat_missing() -> str | None:
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").exists():
        return "no /proc/PID/task/*/schedstat here (Linux with schedstats only)"
    return None


def _perf_missing() -> str | None:
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    try:
        done = subprocess.run([perf, "stat", "-e", PERF_EVENT, "-x,", "true"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"perf stat failed: {exc}"
    if done.returncode != 0 or _perf_count(done.stderr) is None:
        return (f"perf stat -e {PERF_EVENT} does not count here (tracefs, "
                f"perf_event_paranoid?): {done.stderr.strip()[-200:]}")
    try:
        subprocess.run([perf, "stat", "--control", "fd:0", "-D", "-1", "-e", PERF_EVENT,
                        "-x,", "true"], capture_output=True, text=True, timeout=30, check=True,
                       stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"this perf has no --control (perf >= 5.9 has): {exc}"
    return None


def _callgrind_missing() -> str | None:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install valgrind)"
    return None


# -- CPU time ---------------------------------------------------------------------------------

def thread_cpu_ns(pid: int) -> dict[int, int]:
    """{thread id: nanoseconds it has run} from /proc/PID/task/*/schedstat."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return out


class Schedstat:
    """CPU ns the process's threads ran over the window (threads that started inside the
    window count from zero; a thread that ended inside it is lost, which none of the servers
    do while they serve)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.before: dict[int, int] = {}

    def start(self) -> None:
        self.before = thread_cpu_ns(self.pid)

    def stop(self) -> int | None:
        after = thread_cpu_ns(self.pid)
        if not after:
            return None
        return sum(ns - self.before.get(tid, 0) for tid, ns in after.items())

    def close(self) -> None:
        pass


# -- system calls -----------------------------------------------------------------------------

def _perf_count(text: str) -> int | None:
    """The count in perf stat -x, output ("229,,raw_syscalls:sys_enter,...")."""
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] == PERF_EVENT:
            return int(fields[0]) if fields[0].isdigit() else 0 if "not counted" in fields[0] \
                else None
    return None


class PerfSyscalls:
    """perf stat attached to every thread of the process, counting system call entries; it
    is started (disabled) when the server is ready and counts only between start() and
    stop(), switched through its control FIFO and waiting for perf's ack each time."""

    def __init__(self, pid: int, workdir: Path):
        self.dir = workdir / f"perf-{pid}"
        self.dir.mkdir(parents=True, exist_ok=True)
        ctl, ack, self.out = self.dir / "ctl", self.dir / "ack", self.dir / "stat.csv"
        for fifo in (ctl, ack):
            if fifo.exists():
                fifo.unlink()
            os.mkfifo(fifo)
        self.proc = subprocess.Popen(
            ["perf", "stat", "-e", PERF_EVENT, "-x,", "-D", "-1", "--control",
             f"fifo:{ctl},{ack}", "-p", str(pid), "-o", str(self.out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Opening a FIFO blocks until the other side opens it: perf opens both at start-up.
        self.ctl = open(ctl, "w")
        self.ack = open(ack)
        self.failed = False

    def _say(self, command: str) -> None:
        try:
            self.ctl.write(command + "\n")
            self.ctl.flush()
            # perf writes "ack\n" with its terminating NUL: the next line starts with it
            if self.ack.readline().strip("\0\n ") != "ack":
                self.failed = True
        except OSError:
            self.failed = True

    def start(self) -> None:
        self._say("enable")

    def stop(self) -> int | None:
        self._say("disable")
        self.close()
        if self.failed or not self.out.exists():
            return None
        return _perf_count(self.out.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.ctl, self.ack):
            try:
                f.close()
            except OSError:
                pass


# -- user-space instructions ------------------------------------------------------------------

def callgrind_argv(argv: tuple, workdir: Path) -> tuple:
    """argv run under callgrind, uninstrumented until Callgrind.on(); one process (none of the
    servers fork), all its threads counted together."""
    return ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no",
            f"--callgrind-out-file={workdir}/callgrind.out.%p", *argv)


def _control(pid: int, *args: str) -> bool:
    done = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    return done.returncode == 0 and "OK" in done.stdout


def dump_instructions(path: Path) -> int | None:
    """Ir in a callgrind dump: its `summary:` line, else its `totals:` line."""
    totals = None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
        if line.startswith("totals:"):
            totals = int(line.split()[1])
    return totals


# OpenSSL's own work in a dump: the inclusive cost of every call into it, through kqfast's
# wrappers (tls.c) or Python's ssl module (Modules/_ssl.c; not its clinic wrappers, which the
# functions named here are inside of).
# (Entry points only: none of these calls another of them.)
_OPENSSL_ENTRIES = re.compile(
    r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+\S*(/tls\.c:kq_tls_(read|write|feed|take_out|"
    r"close_notify|accept|release|pending_in|pending_out)|Modules/_ssl\.c:(_ssl__SSLSocket_("
    r"do_handshake|read|write|shutdown)|_ssl__SSLContext__wrap_bio|PySSL_dealloc|"
    r"_ssl_MemoryBIO_(read|write)_impl))(\s|$)")


def dump_openssl_instructions(path: Path) -> int | None:
    """How many of a dump's instructions ran inside OpenSSL, called by kqfast or by Python's
    ssl module (None: callgrind_annotate is missing or found nothing)."""
    try:
        done = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                               str(path)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    # The per-function table, where a function may appear under two file names (the debug
    # information's, and the one found from the current directory): counted once.
    functions = done.stdout.split("-- Auto-annotated source", 1)[0]
    cost: dict[str, int] = {}
    for line in functions.splitlines():
        match = _OPENSSL_ENTRIES.match(line)
        if match:
            name = match.group(2).rsplit(":", 1)[1]
            cost[name] = max(cost.get(name, 0), int(match.group(1).replace(",", "")))
    return sum(cost.values()) or None


class Callgrind:
    """For a server started with callgrind_argv: on() before the warm-up, start() zeroes,
    stop() dumps and returns the instructions counted in between."""

    def __init__(self, pid: int, workdir: Path):
        self.pid, self.workdir = pid, workdir
        self.ok = True
        self.dump: Path | None = None   # the window's dump, once stop() made it
        # Seconds each command took: the counted window starts and ends that much after the
        # load generator's; about the same at both ends, so the window is shifted rather than
        # shortened (reported with the run as callgrind_lag_s).
        self.lag: list[float] = []

    def _timed(self, *args: str) -> bool:
        t0 = time.monotonic()
        ok = _control(self.pid, *args)
        self.lag.append(round(time.monotonic() - t0, 3))
        return ok

    def on(self) -> None:
        self.ok = _control(self.pid, "-i", "on")

    def start(self) -> None:
        self.ok = self.ok and self._timed("-z")

    def stop(self) -> int | None:
        before = set(self.workdir.glob(f"callgrind.out.{self.pid}.*"))
        if not (self.ok and self._timed("-d")):
            return None
        dumps = sorted(set(self.workdir.glob(f"callgrind.out.{self.pid}.*")) - before,
                       key=lambda p: p.stat().st_mtime)
        self.dump = dumps[-1] if dumps else None
        return dump_instructions(self.dump) if dumps else None

    def close(self) -> None:
        pass
