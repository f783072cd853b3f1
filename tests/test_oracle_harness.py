"""tests/asyncio_oracle/run.py judges what it was meant to: its kqfast run really runs on
kqfast.Loop, and a run that does not (sitecustomize.py not imported) counts as a failure
rather than as tests passed on asyncio's loop twice.  One small module of CPython's
test_asyncio (test_context) is enough to show it."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ORACLE = Path(__file__).resolve().parent / "asyncio_oracle"
MODULE = "test.test_asyncio.test_context"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("test.test_asyncio") is None,
                                reason="this Python has no test.test_asyncio")


def oracle(where: Path, out: Path, *modules: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(where / "run.py"), "--out", str(out), *modules],
                          capture_output=True, text=True, timeout=120)


def test_both_loops_pass_the_module(tmp_path):
    done = oracle(ORACLE, tmp_path, MODULE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failing only on kqfast.Loop: 0" in done.stdout
    # The kqfast run's driver saw kqfast's loop as asyncio's default.
    first = (tmp_path / f"kqfast-{MODULE}.jsonl").read_text().splitlines()[0]
    assert '"loop": "kqfast.loop.Loop"' in first


def test_a_kqfast_run_off_kqfast_loop_is_a_crash(tmp_path):
    # The harness without its sitecustomize.py: asyncio's default loop stays asyncio's.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("run.py", "driver.py"):
        shutil.copy(ORACLE / name, bare / name)
    done = oracle(bare, tmp_path / "out", MODULE)
    assert done.returncode == 1
    assert f"crash {MODULE}" in done.stdout
    assert "meant for kqfast's loop, ran on asyncio." in done.stderr


def test_a_module_for_another_platform_is_one_skip(tmp_path):
    done = oracle(ORACLE, tmp_path, "test.test_asyncio.test_windows_events")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kqfast   1 tests: skip 1" in done.stdout
