"""What a newcomer meets before serving anything: one version everywhere, a package whose
dir() is its API, python -m kqfast, and help() that teaches."""
from __future__ import annotations

import importlib.metadata
import inspect
import pydoc
import re
import subprocess
import sys

import pytest

import kqfast
from support import echo_command


def test_one_version_for_the_package_the_metadata_and_the_commands():
    assert kqfast.__version__ == importlib.metadata.version("kqfast")
    assert ".dev" in kqfast.__version__  # nothing has been released: the version says so
    for argv in (echo_command("--version"), [sys.executable, "-m", "kqfast.bench_cli",
                                             "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.split()[-1] == kqfast.__version__


def test_dir_shows_the_public_api_and_no_module():
    names = dir(kqfast)
    assert sorted(names) == sorted(kqfast.__all__)
    for module in ("loop", "_core", "_server", "_tutorial", "_addresses", "cli"):
        assert module not in names
    for name in kqfast.__all__:
        assert hasattr(kqfast, name), name


def test_all_puts_the_asyncio_loop_first_and_the_tutorial_poller_last():
    assert kqfast.__all__[0] == "Loop"
    assert kqfast.__all__.index("EventLoop") > kqfast.__all__.index("Server")


def test_python_m_kqfast_says_version_backend_tls_engine_and_python():
    done = subprocess.run([sys.executable, "-m", "kqfast"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"kqfast {kqfast.__version__}" in done.stdout
    assert f"backend     {kqfast.BACKEND}" in done.stdout
    assert f"TLS engine  {kqfast.TLS_ENGINE}" in done.stdout
    assert f"Python      {'.'.join(map(str, sys.version_info[:3]))}" in done.stdout


def test_python_m_kqfast_echo_runs_kqfast_echo():
    done = subprocess.run([sys.executable, "-m", "kqfast", "echo", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "usage: kqfast-echo" in done.stdout
    done = subprocess.run([sys.executable, "-m", "kqfast", "nonsense"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "no command 'nonsense'" in done.stderr


def test_help_of_server_lists_every_parameter():
    text = pydoc.render_doc(kqfast.Server, renderer=pydoc.plaintext)
    for name in inspect.signature(kqfast.Server).parameters:
        assert re.search(rf"^[ |]*{name}[ ,]", text, re.MULTILINE), name


def test_help_of_loop_teaches_how_to_use_it():
    doc = kqfast.Loop.__doc__ or ""
    for usage in ("kqfast.run(main())", "loop_factory=kqfast.new_event_loop",
                  "--loop kqfast:new_event_loop", "kqfast.EventLoop"):
        assert usage in doc, usage


@pytest.mark.parametrize("name", ["EventLoop", "listen"])
def test_the_tutorial_level_says_it_is_not_the_asyncio_loop(name):
    doc = getattr(kqfast, name).__doc__ or ""
    assert "kqfast.Loop" in (doc + (kqfast._tutorial.__doc__ or ""))
