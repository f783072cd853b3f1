"""Shared fixtures: the backend check, kqfast-echo in a subprocess, in-process servers.

Every test body runs on whichever poller backend the installed build has; set
KQFAST_BACKEND=kqueue|epoll to make the session fail unless the build is that backend."""
from __future__ import annotations

import os
import ssl

import pytest
import trustme

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


@pytest.fixture(scope="session")
def tls():
    """(server context, client context) from a trustme CA, for "localhost"."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory, tls):
    """A certificate chain and key as PEM files (for kqfast-echo, openssl and uvicorn), and
    the client context that trusts them."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    where = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(where / "cert.pem")
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(where / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(where / "key.pem")
    ca.cert_pem.write_to_path(where / "ca.pem")
    client = ssl.create_default_context(cafile=str(where / "ca.pem"))
    return where / "cert.pem", where / "key.pem", client
