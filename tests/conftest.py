"""Shared fixtures: the backend check, kqfast-echo in a subprocess, in-process servers.

Every test body runs on whichever poller backend the installed build has; set
KQFAST_BACKEND=kqueue|epoll to make the session fail unless the build is that backend."""
from __future__ import annotations

import os

import pytest

import kqfast
from support import EchoProcess, start_echo


def pytest_report_header(config):
    """Names the backend under test in pytest's header."""
    return f"kqfast backend: {kqfast.BACKEND}"


@pytest.fixture(scope="session", autouse=True)
def backend_is_the_one_asked_for():
    """Fails the run when KQFAST_BACKEND asks for a backend this build does not call."""
    wanted = os.environ.get("KQFAST_BACKEND", "auto")
    if wanted != "auto":
        assert kqfast.BACKEND == wanted, f"asked for {wanted}, built {kqfast.BACKEND}"


@pytest.fixture
def echo_server():
    """A factory for kqfast-echo processes, all killed at the end of the test."""
    started: list[EchoProcess] = []

    def start(*args: str, env: dict | None = None) -> EchoProcess:
        server = start_echo(*args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()


@pytest.fixture(params=["native", "python"])
def handler_kind(request):
    """Each kqfast-echo contract test runs with the native and the Python handler."""
    return request.param


@pytest.fixture
def serve():
    """Starts kqfast.Server(...) in background threads; stops them all at the end."""
    servers: list[kqfast.Server] = []

    def start(handler, **kwargs) -> kqfast.Server:
        kwargs.setdefault("port", 0)
        server = kqfast.Server(handler, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop(timeout=1.0)
