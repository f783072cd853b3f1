"""kqfast-bench and the bench runner work: short runs, not timed benchmarks.  kqfast-bench
must see zero errors against a correct echo server (raw and line mode), and must catch a
server that corrupts or drops what it echoes."""
from __future__ import annotations

import json
import os
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


@pytest.mark.measurement
@pytest.mark.timeout(600)
def test_runner_quick_run_writes_results_and_names_what_is_missing(tmp_path):
    """The whole field on a smoke run, with uvloop and matplotlib made unimportable: the runner
    must leave them out, say so, and still write its results."""
    hidden = tmp_path / "hidden"
    for name in ("uvloop", "matplotlib"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} hidden')\n")
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(hidden)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert "uvloop" in results["missing"] and "matplotlib" in results["charts_missing"]
    assert "left out: uvloop" in markdown and "no charts" in markdown
    for workload in results["workloads"]:
        native = results["load"][workload]["kqfast-echo"]
        assert native["rounds"] == 1 and native["errors"] == 0 and native["requests_per_second"]
    assert results["idle_memory"]["kqfast-echo"]["bytes_per_connection"] is not None
    assert {t["target"] for t in results["targets"]} and results["gil"]

    # The charts, from the same results, where matplotlib is importable here.
    sys.path.insert(0, str(BENCH))
    try:
        import report
        written, why = report.charts(results, out)
    finally:
        sys.path.remove(str(BENCH))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written == [] and "matplotlib" in why
    else:
        assert written and all((out / name).stat().st_size > 0 for name in written)
