"""kqfast-bench and the bench runner work: short runs, not timed benchmarks.  kqfast-bench
must see zero errors against a correct echo server (raw and line mode), and must catch a
server that corrupts or drops what it echoes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(address, *args: str) -> tuple[int, dict | None, str]:
    """Runs kqfast-bench --json; returns (exit code, report or None, stderr)."""
    host, port = address
    done = subprocess.run([sys.executable, "-m", "kqfast.bench_cli", f"{host}:{port}", "--json",
                           *args], capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout) if done.stdout else None, done.stderr


@pytest.mark.parametrize("mode", ["raw", "line"])
def test_bench_against_kqfast_echo_sees_no_errors(echo_server, mode):
    server = echo_server("--mode", mode)
    code, report, err = bench((server.host, server.port), "-c", "8", "-s", "100", "-p", "4",
                              "-d", "1", "-w", "0.2")
    assert code == 0, err
    assert report["errors"] == 0 and report["requests"] > 0
    assert report["connected"] == 8
    lat = report["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert report["client_cpu"]["user_us_per_request"] is not None
    assert "kqfast-bench: measuring" in err and "req/s" in err and "kqfast-bench: done" in err


class FaultyEcho:
    """An echo server in a thread that spoils the stream after `after` bytes: flips one byte
    ("flip") or closes the connection ("close")."""

    def __init__(self, fault: str, after: int = 1000):
        self.fault, self.after = fault, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        echoed = 0
        with conn:
            while True:
                try:
                    data = bytearray(conn.recv(65536))
                except OSError:
                    return
                if not data:
                    return
                if echoed + len(data) > self.after:
                    if self.fault == "close":
                        return
                    data[self.after - echoed if self.after >= echoed else 0] ^= 0x20
                    self.after = float("inf")  # one corrupt byte is enough
                echoed += len(data)
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("fault, kind", [("flip", "mismatch"), ("close", "closed")])
def test_bench_catches_a_faulty_echo(fault, kind):
    server = FaultyEcho(fault)
    try:
        code, report, err = bench(server.address, "-c", "2", "-d", "1", "-w", "0.2")
    finally:
        server.close()
    assert code == 1
    assert report["errors"] >= 1 and report["error_kinds"][kind] >= 1, report


def test_bench_reports_a_refused_connection_in_one_line():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = probe.getsockname()
    code, report, err = bench(address, "-d", "0.2")
    assert code == 1 and report is None
    assert err.count("\n") == 1 and "refused" in err


# The runner on a very short run of a small field: its output's shape, never a timing or a
# ratio.  uvloop is made unimportable, so the runner must name it as missing; kqfast's asyncio
# loop is asked for too, and is either measured or named as missing with the reason.
RUNNER_SERVERS = "kqfast-echo,c,uvloop,kqfast-loop,kqfast-echo-tls,kqfast-loop-tls"


def hide(tmp_path: Path, *names: str) -> dict:
    """An environment in which importing each of `names` raises ImportError."""
    hidden = tmp_path / "hidden"
    for name in names:
        (hidden / name).mkdir(parents=True, exist_ok=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} hidden')\n")
    return {**os.environ, "PYTHONPATH": str(hidden)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--only",
                           RUNNER_SERVERS, "--workloads", "pingpong,tls-pingpong", "--out",
                           str(out)],
                          capture_output=True, text=True, timeout=300, env=hide(tmp, "uvloop"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), done.stderr


@pytest.mark.measurement
@pytest.mark.timeout(300)
def test_runner_quick_run_writes_results_and_names_what_is_missing(quick_run):
    out, results, stderr = quick_run
    for key in ("command", "machine", "config", "instruments", "servers", "missing",
                "workloads", "load", "http", "ratios", "idle_memory", "gil", "targets", "runs",
                "charts", "charts_missing", "progress"):
        assert key in results, key
    assert results["complete"] and results["progress"]["measured"] == results["progress"][
        "planned"] > 0
    assert "uvloop" in results["missing"] and "hidden" in results["missing"]["uvloop"]
    assert ("kqfast-loop" in results["servers"]) != ("kqfast-loop" in results["missing"])
    assert set(results["workloads"]) == {"pingpong"}
    for key in ("kqfast-echo", "c"):
        m = results["load"]["pingpong"][key]
        assert m["rounds"] == 1 and m["errors"] == 0 and m["requests_per_second"] > 0
        for figure, instrument in (("cpu_ns", "schedstat"), ("syscalls", "perf"),
                                   ("instructions", "callgrind")):
            if results["instruments"][instrument] is None:
                assert m[figure] > 0, (key, figure)
            else:  # not available here: left empty, and the reason given
                assert m[figure] is None and "not available" in (out / "results.md").read_text()
        assert results["idle_memory"][key]["bytes_per_connection"] is not None
    assert results["gil"] and all(r["rps_none"] for r in results["gil"])
    # TLS echo under redis-benchmark --tls, natively and on the loop; OpenSSL's share too.
    assert set(results["tls_workloads"]) == {"tls-pingpong"}
    for key in ("kqfast-echo-tls", "kqfast-loop-tls"):
        if shutil.which("redis-benchmark") is None:  # the TLS load: left out, and named
            assert "redis-benchmark is not installed" in results["missing"][key], key
            continue
        m = results["tls"]["tls-pingpong"][key]
        assert m["rounds"] == 1 and m["requests_per_second"] > 0 and m["cpu_ns"] > 0, key
        if results["instruments"]["callgrind"] is None:
            assert 0 < m["openssl_instructions"] < m["instructions"], key
    # Every run as measured, and the progress lines with an estimate.
    assert {r["pass"] for r in results["runs"]["load"]} <= {"native", "callgrind"}
    assert "[1/" in stderr and "(eta " in stderr


@pytest.mark.measurement
@pytest.mark.timeout(300)
def test_runner_quick_run_is_too_short_to_judge(quick_run):
    out, results, stderr = quick_run
    assert results["verdicts"] == "too short to judge"
    statuses = [t["status"] for t in results["targets"]]
    assert all(t["met"] is None for t in results["targets"])
    assert "too short to judge" in statuses
    assert not any(s in ("met", "missed") for s in statuses)
    if "kqfast-loop" in results["missing"]:
        assert any(s.startswith("missing: kqfast-loop") for s in statuses)
    markdown = (out / "results.md").read_text()
    assert "too short to judge" in markdown and "left out: uvloop" in markdown
    assert "| server |" in markdown and "instructions per request" in markdown
    assert "**missed**" not in markdown and "| met |" not in markdown


@pytest.mark.measurement
@pytest.mark.timeout(300)
def test_runner_writes_charts(quick_run, tmp_path):
    out, results, stderr = quick_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert results["charts"] == [] and "matplotlib" in results["charts_missing"]
    else:
        assert "instructions_per_request.png" in results["charts"]
        for name in results["charts"]:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
            assert f"]({name})" in (out / "results.md").read_text()
    # Without matplotlib: no charts, and the reason.
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import report; "
            "print(json.dumps(report.charts(json.load(open(sys.argv[2])), __import__('pathlib')"
            ".Path(sys.argv[3]))))")
    done = subprocess.run([sys.executable, "-c", code, str(BENCH), str(out / "results.json"),
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env=hide(tmp_path, "matplotlib"))
    assert done.returncode == 0, done.stderr
    written, why = json.loads(done.stdout)
    assert written == [] and "matplotlib" in why


@pytest.mark.measurement
@pytest.mark.timeout(300)
def test_runner_writes_what_it_measured_when_interrupted(tmp_path):
    out = tmp_path / "results"
    runner = subprocess.Popen([sys.executable, str(BENCH / "run.py"), "--quick", "--only",
                               "kqfast-echo", "--workloads", "pingpong", "--skip",
                               "callgrind,idle", "--out", str(out)],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in runner.stderr:
            if line.startswith("[1/"):
                break
        assert (out / "results.json").exists()  # written after the first measurement
        runner.send_signal(signal.SIGINT)
        rest = runner.communicate(timeout=120)[1]
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 130, rest[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert not results["complete"] and "Ctrl-C" in results["progress"]["interrupted"]
    assert results["load"]["pingpong"]["kqfast-echo"]["rounds"] == 1
    assert "Incomplete" in (out / "results.md").read_text()


# ---- the end of a run: a clean close, which servers do not log ---------------------------

STREAMS_SERVER = """
import asyncio, sys, kqfast

async def echo(reader, writer):
    # As stream servers are written: no handler for resets, so a reset gets logged.
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    server.close()
    await server.wait_closed()

if sys.argv[1] == "kqfast":
    kqfast.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "kqfast"])
def test_bench_ends_each_connection_cleanly_so_a_streams_server_logs_nothing(loop):
    """kqfast-bench reads the replies in flight, then closes with a FIN: a streams server on
    asyncio's loop or on kqfast.Loop sees EOF, never ConnectionResetError."""
    server = subprocess.Popen([sys.executable, "-c", STREAMS_SERVER, loop], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        ready = server.stdout.readline().split()
        assert ready and ready[0] == "READY", server.stderr.read()
        code, report, err = bench(("127.0.0.1", int(ready[1])), "-c", "20", "-p", "4",
                                  "-d", "0.5", "-w", "0.1")
        assert code == 0 and report["errors"] == 0, err
        _, server_err = server.communicate("", timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0
    assert server_err == "", server_err


def test_bench_drives_a_unix_socket_server(echo_server, tmp_path):
    server = echo_server("--host", str(tmp_path / "echo.sock"), "--mode", "raw")
    done = subprocess.run([sys.executable, "-m", "kqfast.bench_cli", server.path, "--json",
                           "-c", "4", "-d", "0.3", "-w", "0.1"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["target"] == server.path
    assert report["connected"] == 4 and report["errors"] == 0 and report["requests"] > 0
