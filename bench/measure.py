"""One measurement each: a load run (kqfast-bench against a server, the server's cost read over
exactly the measured window by bench/instruments.py), an HTTP run (wrk against a server, the
same instruments), a TLS run (redis-benchmark --tls against a TLS echo server), the memory
idle connections cost a server, and the native loop's round trips next to a spinning Python
thread."""
from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import instruments
from field import SERVERS, Running, pin
from kqfast.bench_cli import DONE, MEASURING


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    connections: int
    size: int
    pipeline: int


@dataclass(frozen=True)
class Cpus:
    """Where the server and the load generator run (None: wherever the kernel likes)."""
    server: int | None
    client: int | None


class Window:
    """The instruments a run reads over its measured window: `kind` "native" is the server as
    it is, read by schedstat (CPU ns), perf (system calls) and psutil (tick-sampled user/sys);
    "callgrind" is the server under valgrind, read by callgrind alone (valgrind's own work
    would spoil the others).  `have` is instruments.available(): a missing one stays None."""

    def __init__(self, kind: str, have: dict, workdir: Path, openssl: bool = False):
        self.kind, self.have, self.workdir = kind, have, workdir
        self.openssl = openssl  # also count OpenSSL's own share (callgrind, TLS servers)
        self.parts: dict = {}
        self.proc = None
        self.cpu0 = self.cpu1 = None
        self.counts: dict = {}

    def argv(self, argv: tuple) -> tuple:
        return instruments.callgrind_argv(argv, self.workdir) if self.kind == "callgrind" \
            else argv

    @property
    def ready_timeout(self) -> float:
        return 300.0 if self.kind == "callgrind" else 30.0

    def ready(self, pid: int) -> None:
        if self.kind == "callgrind":
            self.parts["instructions"] = instruments.Callgrind(pid, self.workdir)
            self.parts["instructions"].on()
            return
        self.proc = psutil.Process(pid)
        if self.have.get("schedstat") is None:
            self.parts["cpu_ns"] = instruments.Schedstat(pid)
        if self.have.get("perf") is None:
            self.parts["syscalls"] = instruments.PerfSyscalls(pid, self.workdir)

    def start(self) -> None:
        if self.proc is not None:
            self.cpu0 = self.proc.cpu_times()
        for part in self.parts.values():
            part.start()

    def stop(self) -> None:
        for name, part in self.parts.items():
            self.counts[name] = part.stop()
        if self.proc is not None:
            self.cpu1 = self.proc.cpu_times()

    def close(self) -> None:
        for part in self.parts.values():
            part.close()

    def figures(self, requests: int, duration: float) -> dict:
        """The server's cost per request (None: not measured by this pass or unavailable)."""
        out: dict = {}
        names = ("instructions",) if self.kind == "callgrind" else ("cpu_ns", "syscalls")
        for name in names:
            count = self.counts.get(name)
            out[name] = count
            out[f"{name}_per_request"] = count / requests if count is not None and requests \
                else None
        if self.kind == "callgrind" and "instructions" in self.parts:
            out["callgrind_lag_s"] = self.parts["instructions"].lag
            dump = self.parts["instructions"].dump
            if self.openssl and dump is not None:
                count = instruments.dump_openssl_instructions(dump)
                out["openssl_instructions_per_request"] = count / requests if count and \
                    requests else None
        if self.kind == "native" and self.cpu1 is not None:
            user = self.cpu1.user - self.cpu0.user
            system = self.cpu1.system - self.cpu0.system
            out["tick_user_us_per_request"] = user * 1e6 / requests if requests else None
            out["tick_system_us_per_request"] = system * 1e6 / requests if requests else None
            if out.get("cpu_ns") is not None:
                out["busy"] = out["cpu_ns"] / 1e9 / duration
            else:
                out["busy"] = (user + system) / duration
        return out


def load(argv: tuple, workload: Workload, duration: float, warmup: float, cpus: Cpus,
         log: Path, on_event=None, window: Window | None = None) -> dict:
    """Runs kqfast-bench against a fresh server; returns kqfast-bench's report plus the
    server's cost per request over exactly kqfast-bench's measured window ("cost"; from
    `window`, by default the native instruments that work here) and, for the native pass, its
    tick-sampled CPU ("server_cpu", psutil).  on_event(event, server) is called once the server
    is ready, before any load ("ready"), and as the measured window opens ("start") and closes
    ("end")."""
    if window is None:
        window = Window("native", {"schedstat": None, "perf": "not asked for"}, log.parent)
    client = None
    with Running(window.argv(argv), cpus.server, log, window.ready_timeout) as server:
        try:
            window.ready(server.pid)
            if on_event:
                on_event("ready", server)
            client = subprocess.Popen(
                [sys.executable, "-m", "kqfast.bench_cli", f"127.0.0.1:{server.port}", "--json",
                 "-c", str(workload.connections), "-s", str(workload.size),
                 "-p", str(workload.pipeline), "-d", str(duration), "-w", str(warmup),
                 "--connect-timeout", "60"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, preexec_fn=pin(cpus.client))
            ended = False
            stderr = []
            for line in client.stderr:
                stderr.append(line)
                if line.startswith(MEASURING):
                    window.start()
                    if on_event:
                        on_event("start", server)
                elif line.startswith(DONE):
                    window.stop()
                    ended = True
                    if on_event:
                        on_event("end", server)
                    break
            out, rest = client.communicate(timeout=120)
            stderr.append(rest)
        finally:
            window.close()
            if client is not None and client.poll() is None:  # interrupted: no orphan load
                client.kill()
                client.wait()
    if not ended or not out:
        return {"failed": "".join(stderr).strip()[-500:] or f"kqfast-bench exit {client.returncode}"}
    report = json.loads(out)
    report["cost"] = window.figures(report["requests"], report["duration"])
    if window.kind == "native":
        report["server_cpu"] = {  # the tick-sampled figures, kept as an extra column
            "user_us_per_request": report["cost"]["tick_user_us_per_request"],
            "system_us_per_request": report["cost"]["tick_system_us_per_request"],
            "busy": report["cost"]["busy"],
        }
    cpu = report["client_cpu"]
    cpu["busy"] = (cpu["user_s"] + cpu["system_s"]) / report["duration"]
    return report


WRK_REPORT = """-- bench/measure.py: wrk's summary as one JSON line on stdout
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "bytes": %d, "errors": ' ..
    '{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, "latency_us": ' ..
    '{"p50": %g, "p90": %g, "p99": %g, "p99.9": %g, "max": %g, "mean": %g}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def wrk_seconds(seconds: float) -> int:
    """wrk takes whole seconds."""
    return max(1, round(seconds))


def _wrk(port: int, connections: int, seconds: int, cpu: int | None, script: Path) -> dict:
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s",
         str(script), f"http://127.0.0.1:{port}/"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 120,
        preexec_fn=pin(cpu))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"wrk exit {done.returncode}: {(done.stderr or done.stdout)[-300:]}")


def http_load(argv: tuple, connections: int, duration: float, warmup: float, cpus: Cpus,
              log: Path, window: Window) -> dict:
    """wrk against a fresh HTTP server: a warm-up run, then the measured run with the window
    open from just before wrk starts to just after it ends (its 50 connects and closes are
    inside; every response wrk counts is too)."""
    script = log.parent / "wrk_report.lua"
    script.write_text(WRK_REPORT)
    with Running(window.argv(argv), cpus.server, log, window.ready_timeout) as server:
        try:
            window.ready(server.pid)
            if warmup > 0:
                _wrk(server.port, connections, wrk_seconds(warmup), cpus.client, script)
                time.sleep(0.2)  # the warm-up's connections close
            window.start()
            try:
                report = _wrk(server.port, connections, wrk_seconds(duration), cpus.client,
                              script)
            finally:
                window.stop()
        except (RuntimeError, subprocess.SubprocessError) as exc:
            return {"failed": str(exc)}
        finally:
            window.close()
    report["duration"] = report.pop("duration_us") / 1e6
    report["connections"] = connections
    report["requests_per_second"] = report["requests"] / report["duration"]
    report["errors"] = sum(report["errors"].values())
    report["cost"] = window.figures(report["requests"], report["duration"])
    return report


def tls_command(workload: Workload) -> list[str]:
    """What redis-benchmark sends, as a RESP request an echo server's echo answers validly (an
    array of bulk strings): PING, 14 bytes, for the 16-byte workloads; ECHO of enough bytes to
    make the request workload.size long otherwise."""
    if workload.size <= 16:
        return ["PING"]
    body = workload.size - len(f"*2\r\n$4\r\nECHO\r\n${workload.size}\r\n\r\n")
    return ["ECHO", "x" * body]


def _redis_benchmark(port: int, workload: Workload, requests: int, cpu: int | None) -> dict:
    done = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--tls", "--insecure",
         "-c", str(workload.connections), "-n", str(requests), "--csv", *tls_command(workload)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        preexec_fn=pin(cpu))
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"redis-benchmark exit {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-300:]}")
    row = rows[-1]
    return {"requests_per_second": float(row["rps"]),
            "latency_us": {"p50": float(row["p50_latency_ms"]) * 1000,
                           "p90": None, "p99": float(row["p99_latency_ms"]) * 1000,
                           "p99.9": None, "max": float(row["max_latency_ms"]) * 1000}}


def tls_load(argv: tuple, workload: Workload, requests: int, cpus: Cpus, log: Path,
             window: Window) -> dict:
    """redis-benchmark --tls against a fresh TLS echo server: a warm-up run (a tenth of the
    requests), then the measured run with the window open from just before redis-benchmark
    starts to just after it ends, so its connections' handshakes are inside, as a TLS
    server's users pay them.  (redis-benchmark checks that each reply parses, not each byte:
    an echo of its request is a valid reply.)"""
    with Running(window.argv(argv), cpus.server, log, window.ready_timeout) as server:
        try:
            window.ready(server.pid)
            _redis_benchmark(server.port, workload, max(requests // 10, workload.connections),
                             cpus.client)
            window.start()
            started = time.monotonic()
            try:
                report = _redis_benchmark(server.port, workload, requests, cpus.client)
            finally:
                window.stop()
            duration = time.monotonic() - started
        except (RuntimeError, subprocess.SubprocessError) as exc:
            return {"failed": str(exc)}
        finally:
            window.close()
    report.update(requests=requests, duration=duration, connections=workload.connections,
                  errors=0, cost=window.figures(requests, duration))
    return report


def open_idle(port: int, count: int, into: list) -> None:
    """Opens connections one by one, each echoing one line so the server has surely accepted
    and registered it, then leaves them idle."""
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"x\n")
        got = b""
        while len(got) < 2:
            chunk = sock.recv(2 - len(got))
            if not chunk:
                raise RuntimeError("the server closed an idle connection")
            got += chunk
        into.append(sock)


def settled_rss(pid: int) -> int:
    time.sleep(0.5)
    return psutil.Process(pid).memory_info().rss


def idle_memory(argv: tuple, low: int, high: int, cpu: int | None, log: Path) -> dict:
    """RSS growth per connection from `low` to `high` idle connections: what each one costs,
    without the server's start-up and first-use allocations."""
    socks: list = []
    try:
        with Running(argv, cpu, log) as server:
            open_idle(server.port, low, socks)
            rss_low = settled_rss(server.pid)
            open_idle(server.port, high - low, socks)
            rss_high = settled_rss(server.pid)
    finally:
        for sock in socks:
            sock.close()
    return {"connections": [low, high], "rss": [rss_low, rss_high],
            "bytes_per_connection": (rss_high - rss_low) / (high - low)}


class Spinner:
    """Reads the spin counter of servers/gil_echo.py --spin (SIGUSR1 makes it print)."""

    def __init__(self):
        self.marks: dict[str, tuple[int, float]] = {}

    def mark(self, name: str, server: Running) -> None:
        server.proc.send_signal(signal.SIGUSR1)
        spins, at = server.proc.stdout.readline().split()[1:]
        self.marks[name] = (int(spins), float(at))

    def rate(self, start: str, end: str) -> float:
        (s0, t0), (s1, t1) = self.marks[start], self.marks[end]
        return (s1 - s0) / (t1 - t0)


def gil(handler: str, spin: str, workload: Workload, duration: float, warmup: float,
        cpus: Cpus, log: Path) -> dict:
    """Round trips of kqfast serving `handler` while its process also runs a pure-Python
    spinning thread (spin: "none", "nice" at nice 19, "equal" at the loop's priority), and the
    spinner's speed under that load relative to its speed before the load."""
    argv = (sys.executable, str(SERVERS / "gil_echo.py"), "--handler", handler)
    if spin != "none":
        argv += ("--spin", "--nice", "19" if spin == "nice" else "0")
    spinner = Spinner()

    def on_event(event: str, server: Running) -> None:
        if spin == "none":
            return
        spinner.mark(event, server)
        if event == "ready":
            time.sleep(duration)  # the spinner alone, as long as it will run under load
            spinner.mark("idle", server)

    report = load(argv, workload, duration, warmup, cpus, log, on_event)
    if spin != "none" and "failed" not in report:
        report["spinner_speed_under_load"] = spinner.rate("start", "end") / spinner.rate(
            "ready", "idle")
    return report
