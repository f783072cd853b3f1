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
    kind: str = "echo"   # "echo": loaded by kqfast-bench; "http": by wrk; "tls": by
                         # redis-benchmark --tls


def _python(*args) -> tuple:
    return (sys.executable, *map(str, args))


# The asyncio event loops, by the name servers/_loops.py knows them: (key prefix, label).
LOOPS = {"asyncio": ("asyncio", "asyncio"), "uvloop": ("uvloop", "uvloop"),
         "rloop": ("rloop", "rloop"), "kqfast": ("kqfast-loop", "kqfast loop")}
# The programs each loop runs: (key suffix, label, script).
PROGRAMS = [("", "Protocol", "asyncio_echo.py"), ("-streams", "streams", "streams_echo.py")]


def loop_missing(name: str) -> str | None:
    """Why asyncio loop `name` cannot run here (servers/_loops.py's answer), or None."""
    sys.path.insert(0, str(SERVERS))
    try:
        from _loops import missing
        return missing(name)
    finally:
        sys.path.remove(str(SERVERS))


def http_missing() -> str | None:
    for module in ("uvicorn", "httptools"):
        if not importable(module):
            return f"{module} is not installed (pip install 'kqfast[bench]')"
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian: apt-get install wrk)"
    return None


def field(workdir: Path) -> tuple[list[Server], dict[str, str]]:
    """The servers that can run here, in table order, and {key: why not} for the others."""
    echo = _python("-m", "kqfast.cli", "--port", "0")
    servers = [
        Server("kqfast-echo", "kqfast ECHO (native)", echo + ("--mode", "raw")),
        Server("kqfast-line", "kqfast LINE_ECHO (native)", echo + ("--mode", "line")),
        Server("kqfast-python", "kqfast Server, Protocol (Python)",
               echo + ("--mode", "raw", "--handler", "python")),
        Server("selectors", "selectors (pure Python)", _python(SERVERS / "selectors_echo.py")),
    ]
    missing = {}
    loops = {name: loop_missing(name) for name in LOOPS}
    for suffix, program, script in PROGRAMS:
        for name, (prefix, label) in LOOPS.items():
            key = prefix + suffix
            if loops[name] is None:
                servers.append(Server(key, f"{label} {program}",
                                      _python(SERVERS / script, "--loop", name)))
            else:
                missing[key] = loops[name]
    # aiofastnet is not a loop: C transports for any loop's create_server; on uvloop, its
    # fastest pairing.
    why = loops["uvloop"] or (None if importable("aiofastnet") else
                              "aiofastnet is not installed (in kqfast[bench])")
    if why is None:
        servers.append(Server("aiofastnet-uvloop", "aiofastnet on uvloop Protocol",
                              _python(SERVERS / "asyncio_echo.py", "--loop", "uvloop",
                                      "--aiofastnet")))
    else:
        missing["aiofastnet-uvloop"] = why
    binary, why = compile_c_echo(workdir)
    if binary is not None:
        servers.append(Server("c", "C epoll (c_echo.c)", (str(binary),)))
    else:
        missing["c"] = why
    http = http_missing()
    for name, (prefix, label) in LOOPS.items():
        key = f"uvicorn-{prefix}"
        why = http or loops[name]
        if why is None:
            servers.append(Server(key, f"uvicorn on {label}",
                                  _python(SERVERS / "uvicorn_hello.py", "--loop", name), "http"))
        else:
            missing[key] = why
    tls_servers, tls_missing = tls_field(workdir, loops)
    return servers + tls_servers, {**missing, **tls_missing}


def tls_field(workdir: Path, loops: dict) -> tuple[list[Server], dict[str, str]]:
    """The TLS echo servers (a P-256 certificate made here with openssl): kqfast's native
    echo and its loop, asyncio, uvloop, and aiofastnet on asyncio's loop and on uvloop."""
    candidates = [("kqfast-echo-tls", "kqfast ECHO over TLS (native)", None),
                  ("kqfast-loop-tls", "kqfast loop Protocol over TLS", "kqfast"),
                  ("asyncio-tls", "asyncio Protocol over TLS", "asyncio"),
                  ("uvloop-tls", "uvloop Protocol over TLS", "uvloop"),
                  ("aiofastnet-asyncio-tls", "aiofastnet on asyncio over TLS", "asyncio"),
                  ("aiofastnet-uvloop-tls", "aiofastnet on uvloop over TLS", "uvloop")]
    why = (None if shutil.which("redis-benchmark") else
           "redis-benchmark is not installed (Debian: apt-get install redis-tools)")
    cert, key = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    if why is None:
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                               "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                               "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                              capture_output=True, text=True) if shutil.which("openssl") else None
        if made is None or made.returncode != 0:
            why = "openssl could not make a certificate" + (
                f": {made.stderr.strip()[-200:]}" if made else " (no openssl command)")
    servers, missing = [], {}
    for key_, label, loop in candidates:
        reason = why or (loops[loop] if loop else None)
        if reason is None and key_.startswith("aiofastnet") and not importable("aiofastnet"):
            reason = "aiofastnet is not installed (in kqfast[bench])"
        if reason is not None:
            missing[key_] = reason
            continue
        if loop is None:
            argv = _python("-m", "kqfast.cli", "--port", "0", "--mode", "raw", "--tls-cert",
                           cert, "--tls-key", key)
        else:
            argv = _python(SERVERS / "asyncio_echo.py", "--loop", loop, "--tls", cert, key,
                           *(("--aiofastnet",) if key_.startswith("aiofastnet") else ()))
        servers.append(Server(key_, label, argv, "tls"))
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
