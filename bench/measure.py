"""One measurement each: a load run (kqfast-bench against a server, the server's CPU read from
the OS over exactly the measured window), the memory idle connections cost a server, and the
native loop's round trips next to a spinning Python thread."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

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


def load(argv: tuple, workload: Workload, duration: float, warmup: float, cpus: Cpus,
         log: Path, on_event=None) -> dict:
    """Runs kqfast-bench against a fresh server; returns kqfast-bench's report plus the
    server's CPU per request.  on_event(event, server) is called once the server is ready,
    before any load ("ready"), and as the measured window opens ("start") and closes ("end")."""
    with Running(argv, cpus.server, log) as server:
        proc = psutil.Process(server.pid)
        if on_event:
            on_event("ready", server)
        client = subprocess.Popen(
            [sys.executable, "-m", "kqfast.bench_cli", f"127.0.0.1:{server.port}", "--json",
             "-c", str(workload.connections), "-s", str(workload.size),
             "-p", str(workload.pipeline), "-d", str(duration), "-w", str(warmup),
             "--connect-timeout", "60"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=pin(cpus.client))
        before = after = None
        stderr = []
        for line in client.stderr:
            stderr.append(line)
            if line.startswith(MEASURING):
                before = proc.cpu_times()
                if on_event:
                    on_event("start", server)
            elif line.startswith(DONE):
                after = proc.cpu_times()
                if on_event:
                    on_event("end", server)
                break
        out, rest = client.communicate(timeout=120)
        stderr.append(rest)
    if after is None or not out:
        return {"failed": "".join(stderr).strip()[-500:] or f"kqfast-bench exit {client.returncode}"}
    report = json.loads(out)
    requests = report["requests"] or 1
    user, system = after.user - before.user, after.system - before.system
    report["server_cpu"] = {
        "user_us_per_request": user * 1e6 / requests,
        "system_us_per_request": system * 1e6 / requests,
        "busy": (user + system) / report["duration"],
    }
    cpu = report["client_cpu"]
    cpu["busy"] = (cpu["user_s"] + cpu["system_s"]) / report["duration"]
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
