"""The servers under comparison: what each one is, which are missing here and why, and how to
run one pinned to a CPU until its ready line names the port."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

SERVERS = Path(__file__).resolve().parent / "servers"
# Every server prints kqfast-echo's ready line: "... listening on HOST:PORT ...".
READY = re.compile(r"listening on (?:\[[^\]]+\]|[^\s:]+):(\d+)")


@dataclass(frozen=True)
class Server:
    key: str      # the name in results.json
    label: str    # the name in tables and charts
    argv: tuple


def _python(*args) -> tuple:
    return (sys.executable, *map(str, args))


def field(workdir: Path) -> tuple[list[Server], dict[str, str]]:
    """The servers that can run here, in table order, and {key: why not} for the others."""
    echo = _python("-m", "kqfast.cli", "--port", "0")
    servers = [
        Server("kqfast-echo", "kqfast ECHO (native)", echo + ("--mode", "raw")),
        Server("kqfast-line", "kqfast LINE_ECHO (native)", echo + ("--mode", "line")),
        Server("kqfast-python", "kqfast Protocol (Python)",
               echo + ("--mode", "raw", "--handler", "python")),
        Server("selectors", "selectors (pure Python)", _python(SERVERS / "selectors_echo.py")),
        Server("asyncio", "asyncio Protocol", _python(SERVERS / "asyncio_echo.py")),
    ]
    missing = {}
    if importable("uvloop"):
        servers.append(Server("uvloop", "uvloop Protocol",
                              _python(SERVERS / "asyncio_echo.py", "--loop", "uvloop")))
    else:
        missing["uvloop"] = "uvloop is not installed (pip install 'kqfast[bench]')"
    binary, why = compile_c_echo(workdir)
    if binary is not None:
        servers.append(Server("c", "C epoll (c_echo.c)", (str(binary),)))
    else:
        missing["c"] = why
    return servers, missing


def importable(name: str) -> bool:
    try:
        import_module(name)
    except ImportError:
        return False
    return True


def compile_c_echo(workdir: Path) -> tuple[Path | None, str]:
    """Builds servers/c_echo.c with cc -O2; returns (binary, "") or (None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc")
    if cc is None:
        return None, "no C compiler (cc) on PATH"
    binary = workdir / "c_echo"
    done = subprocess.run([cc, "-O2", "-o", str(binary), str(SERVERS / "c_echo.c")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"cc failed (c_echo.c needs epoll, i.e. Linux): {done.stderr.strip()[:300]}"
    return binary, ""


def pin(cpu: int | None):
    """A preexec_fn that moves the child to one CPU (what taskset -c does), or None."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


class Running:
    """A server process, started pinned; its stderr goes to a file (a pipe nobody reads
    could fill and stall it), and the ready line found there gives the port."""

    def __init__(self, argv: tuple, cpu: int | None, log: Path, timeout: float = 30.0):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err, preexec_fn=pin(cpu))
        self.port = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.proc.args[-1]} did not get ready: {self.log.read_text()[-500:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
