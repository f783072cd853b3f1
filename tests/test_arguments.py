"""Every public entry point checks its arguments before it binds or starts anything, and says
in one style which parameter is wrong and what it must be: "port must be an int in
0..65535, not -1".  A wrong type is a TypeError, a value out of range a ValueError."""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import kqfast
from support import connect_to, echo_command, roundtrip

P = asyncio.Protocol


def message(name: str, value: object) -> str:
    """The regex of the style's start and end: "<name> must be ..., not <value>"."""
    return rf"^{re.escape(name)} must be .+, not {re.escape(repr(value))}$"


# ---- kqfast.Server and kqfast.serve -------------------------------------------------------

SERVER_CASES = [
    # (keyword, bad value, exception, what the message must say it expected)
    ("host", b"127.0.0.1", TypeError, "a str (an IP address, a host name or a Unix socket path) or None"),
    ("host", 127, TypeError, "a str"),
    ("port", -1, ValueError, "an int in 0..65535"),
    ("port", 70000, ValueError, "an int in 0..65535"),
    ("port", 8080.0, TypeError, "an int in 0..65535"),
    ("port", "8080", TypeError, "an int in 0..65535"),
    ("port", True, TypeError, "an int in 0..65535"),
    ("workers", "2", TypeError, "an int in 1.."),
    ("workers", 0, ValueError, "an int in 1.."),
    ("backlog", "x", TypeError, "an int in 0.."),
    ("backlog", -1, ValueError, "an int in 0.."),
    ("max_connections", 0, ValueError, "an int in 1.."),
    ("max_connections", 1.5, TypeError, "an int in 1.."),
    ("idle_timeout", -1, ValueError, "a number of seconds >= 0 or None"),
    ("idle_timeout", "60", TypeError, "a number of seconds >= 0 or None"),
    ("idle_timeout", float("nan"), ValueError, "a number of seconds >= 0 or None"),
    ("max_line", 0, ValueError, "an int >= 1"),
    ("max_line", "1", TypeError, "an int >= 1"),
    ("high_water", -1, ValueError, "an int >= 0"),
    ("low_water", 2.5, TypeError, "an int >= 0"),
    ("max_output", "big", TypeError, "an int >= 0"),
    ("reuse_port", 1, TypeError, "True or False"),
    ("linger_timeout", -0.5, ValueError, "a number of seconds >= 0"),
    ("linger_timeout", None, TypeError, "a number of seconds >= 0"),
    ("balance", "random", ValueError, "'reuseport' or 'handoff'"),
    ("balance", 1, TypeError, "'reuseport' or 'handoff'"),
]


@pytest.mark.parametrize("keyword, value, error, expected", SERVER_CASES,
                         ids=[f"{k}={v!r}" for k, v, _, _ in SERVER_CASES])
@pytest.mark.parametrize("entry", ["Server", "serve"])
def test_server_names_the_bad_argument(entry, keyword, value, error, expected):
    kwargs = {"port": 0, keyword: value}
    with pytest.raises(error, match=message(keyword, value)) as raised:
        if entry == "Server":
            kqfast.Server(P, **kwargs)
        else:
            kqfast.serve(P, **kwargs)  # refused before it would serve forever
    assert f"must be {expected}" in str(raised.value)


@pytest.mark.parametrize("handler", [None, "echo", 42])
def test_server_names_a_handler_that_is_none(handler):
    with pytest.raises(TypeError, match=r"^handler must be kqfast.ECHO, kqfast.LINE_ECHO or a "
                                        r"protocol factory, not "):
        kqfast.Server(handler, port=0)


def test_water_marks_and_output_cap_are_checked_against_each_other():
    with pytest.raises(ValueError, match=r"^low_water must be <= high_water \(100\), not 200$"):
        kqfast.Server(P, port=0, high_water=100, low_water=200)
    with pytest.raises(ValueError, match=r"^max_output must be >= high_water \(100\), not 50$"):
        kqfast.Server(P, port=0, high_water=100, low_water=10, max_output=50)


def test_a_refused_argument_binds_nothing():
    """The checks come first: the port asked for is still free after the error."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(TypeError):
        kqfast.Server(P, port=port, workers="2")
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_a_name_that_does_not_resolve_says_so():
    with pytest.raises(OSError, match=r"cannot resolve host 'no.such.invalid'"):
        kqfast.Server(P, "no.such.invalid", 0)


def test_stop_timeout_and_call_soon_threadsafe_callback_are_checked(serve):
    server = serve(kqfast.ECHO)
    with pytest.raises(ValueError, match=message("timeout", -1)):
        server.stop(timeout=-1)
    with pytest.raises(TypeError, match=r"^callback must be callable, not 1$"):
        server.call_soon_threadsafe(1)


# ---- host=None, names, paths -----------------------------------------------------------

def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", [None, ""])
def test_host_none_serves_on_every_interface(serve, host):
    """As asyncio's create_server: None (or "") binds 0.0.0.0 and ::, on one port."""
    server = serve(kqfast.ECHO, host=host)
    hosts = {address[0] for address in server.addresses}
    assert "0.0.0.0" in hosts
    assert server.address == server.addresses[0]
    assert len({address[1] for address in server.addresses}) == 1
    port = server.address[1]
    targets = ["127.0.0.1"] + (["::1"] if has_ipv6_loopback() else [])
    if has_ipv6_loopback():
        assert "::" in hosts
    for target in targets:
        with connect_to((target, port)) as client:
            assert roundtrip(client, b"hello\n") == b"hello\n"


def test_a_name_binds_every_address_it_resolves_to(serve):
    """localhost: every address the resolver gives for it here (127.0.0.1, and ::1 where the
    hosts file names it too)."""
    expected = {info[4][0] for info in socket.getaddrinfo(
        "localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    server = serve(kqfast.ECHO, host="localhost")
    assert {address[0] for address in server.addresses} == expected
    for host, port in server.addresses:
        with connect_to((host, port)) as client:
            assert roundtrip(client, b"hi\n") == b"hi\n"


def test_a_path_object_is_a_unix_socket(serve, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = serve(kqfast.ECHO, host=Path("echo.sock"))
    assert server.address == "./echo.sock"
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(str(tmp_path / "echo.sock"))
        assert roundtrip(client, b"unix\n") == b"unix\n"


# ---- the tutorial level: listen, Socket, EventLoop -----------------------------------------

LISTEN_CASES = [
    ("host", None, TypeError), ("host", b"127.0.0.1", TypeError),
    ("port", -1, ValueError), ("port", 1.5, TypeError), ("port", "80", TypeError),
    ("backlog", "x", TypeError), ("backlog", -1, ValueError),
    ("reuse_port", "yes", TypeError),
]


@pytest.mark.parametrize("keyword, value, error", LISTEN_CASES,
                         ids=[f"{k}={v!r}" for k, v, _ in LISTEN_CASES])
def test_listen_names_the_bad_argument(keyword, value, error):
    kwargs = {"host": "127.0.0.1", "port": 0, keyword: value}
    with pytest.raises(error, match=message(keyword, value)):
        kqfast.listen(**kwargs)


def test_listen_says_cannot_resolve_host_as_server_does():
    with pytest.raises(OSError, match=r"^\[Errno -?\d+\] cannot resolve host 'no.such.invalid'"):
        kqfast.listen("no.such.invalid", 0)


@pytest.mark.parametrize("n, error", [("x", TypeError), (-1, ValueError), (1.0, TypeError)])
def test_socket_read_names_n(n, error):
    with kqfast.listen("127.0.0.1", 0) as sock:
        with pytest.raises(error, match=message("n", n)):
            sock.read(n)


def test_socket_write_names_data():
    with kqfast.listen("127.0.0.1", 0) as sock:
        with pytest.raises(TypeError, match=r"^data must be a bytes-like object, not 'text'$"):
            sock.write("text")


def test_eventloop_without_a_socket_points_to_the_asyncio_loop():
    with pytest.raises(TypeError) as raised:
        kqfast.EventLoop()  # type: ignore[call-arg]
    text = str(raised.value)
    assert "tutorial's poller over a listening kqfast.Socket" in text
    assert "kqfast.Loop()" in text and "kqfast.new_event_loop()" in text


def test_eventloop_names_a_socket_of_the_wrong_kind():
    with socket.socket() as plain:
        with pytest.raises(TypeError, match=r"^sock must be a kqfast.Socket from kqfast.listen\(\)"
                                            r", not <socket.socket"):
            kqfast.EventLoop(plain)  # type: ignore[arg-type]


def test_eventloop_handle_names_the_handler():
    with kqfast.listen("127.0.0.1", 0) as sock:
        with pytest.raises(TypeError, match=r"^handler must be callable, not None$"):
            kqfast.EventLoop(sock).handle(None)  # type: ignore[arg-type]


# ---- kqfast.run -------------------------------------------------------------------------

async def answer() -> int:
    return 42


def test_run_names_main():
    if sys.version_info >= (3, 14):  # asyncio.run takes any awaitable from 3.14 on
        with pytest.raises(TypeError, match=r"^main must be a coroutine or an awaitable, not 1$"):
            kqfast.run(1)  # type: ignore[arg-type]
    else:  # a ValueError, as asyncio.run raises
        with pytest.raises(ValueError, match=r"^main must be a coroutine, not 1$"):
            kqfast.run(1)  # type: ignore[arg-type]


def test_run_names_debug():
    coro = answer()
    with pytest.raises(TypeError, match=r"^debug must be None, True or False, not 'yes'$"):
        kqfast.run(coro, debug="yes")  # type: ignore[arg-type]
    coro.close()


def test_run_refuses_another_loop_factory():
    coro = answer()
    with pytest.raises(TypeError, match=r"always runs kqfast's loop"):
        kqfast.run(coro, loop_factory=asyncio.new_event_loop)
    coro.close()


# ---- the command lines ------------------------------------------------------------------

def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("host, hint", [
    ("127.0.0.1:9000", "use --host 127.0.0.1 --port 9000"),
    ("[::1]:9000", "use --host [::1] --port 9000"),
    ("localhost:80", "use --host localhost --port 80"),
])
def test_echo_host_with_a_port_hints_at_port(host, hint):
    done = run_cli(echo_command("--host", host))
    assert done.returncode == 2
    assert f"argument --host: {host!r} has a port: {hint}" in done.stderr


def test_echo_processes_with_a_unix_path_says_tcp_only(tmp_path):
    done = run_cli(echo_command("--host", str(tmp_path / "s"), "--processes", "2"))
    assert done.returncode == 2
    assert "--processes needs a TCP host" in done.stderr


def bench_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kqfast.bench_cli", *args]


@pytest.mark.parametrize("args, said", [
    (["127.0.0.1"], "argument HOST:PORT"),
    (["127.0.0.1:99999"], "argument HOST:PORT"),
    (["127.0.0.1:8080", "-c", "0"], "argument -c/--connections: must be at least 1"),
    (["127.0.0.1:8080", "-s", "1"], "argument -s/--size: must be at least 2"),
    (["127.0.0.1:8080", "-d", "-1"], "argument -d/--duration"),
])
def test_bench_names_the_bad_argument(args, said):
    done = run_cli(bench_command(*args))
    assert done.returncode == 2
    assert said in done.stderr


def test_run_passes_its_other_keywords_to_asyncio():
    """debug reaches the loop; any other keyword is asyncio.run's (3.12+) or asyncio.Runner's
    (3.11) to judge, and Python 3.10's asyncio.run takes none."""
    async def debug_is_on() -> bool:
        return asyncio.get_running_loop().get_debug()

    assert kqfast.run(debug_is_on(), debug=True) is True
    coro = answer()
    expected = "takes debug only" if sys.version_info < (3, 11) else "unexpected keyword"
    with pytest.raises(TypeError, match=expected):
        kqfast.run(coro, no_such_option=1)
    coro.close()
