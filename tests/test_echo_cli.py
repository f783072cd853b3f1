"""kqfast-echo, clause by clause of its contract (design.md, "`kqfast-echo` (contract)"); every
test runs once with --handler native and once with --handler python."""
from __future__ import annotations

import hashlib
import random
import re
import select
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

import kqfast
from kqfast._server import default_max_connections
from support import (
    LineReader, connect_refused, connect_to, echo_through, recv_exactly, recv_until_closed,
    roundtrip, run_echo,
)

READY_LINE = re.compile(
    r"kqfast-echo: listening on (?P<where>\S+) \(backend=(?P<backend>[^,]+), "
    r"handler=(?P<handler>[^,]+), mode=(?P<mode>[^,]+), workers=(?P<workers>\d+)\)")

BLANK_LINES = [b"\n", b"\r\n", b"  \t \r\n"]


@pytest.fixture
def echo(echo_server, handler_kind):
    """Starts kqfast-echo with the handler under test plus the given arguments."""
    def start(*args: str):
        return echo_server("--handler", handler_kind, *args)
    return start


def random_bytes(n: int, seed: int) -> bytes:
    """n reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


# ---- the ready line --------------------------------------------------------------------

@pytest.mark.parametrize("extra, mode, workers", [
    ((), "line", "1"),
    (("--mode", "raw", "--workers", "2"), "raw", "2"),
])
def test_ready_line_names_address_backend_handler_mode_workers(echo, handler_kind, extra,
                                                               mode, workers):
    """The ready line on stderr has the documented shape and tells the truth."""
    server = echo(*extra)
    match = READY_LINE.fullmatch(server.ready_line.rstrip("\n"))
    assert match, server.ready_line
    assert match["where"] == f"127.0.0.1:{server.port}"
    assert match["backend"] == kqfast.BACKEND
    assert match["handler"] == handler_kind
    assert match["mode"] == mode
    assert match["workers"] == workers


def test_port_zero_shows_the_real_port(echo):
    """With --port 0 the ready line shows the port really bound, and it serves."""
    server = echo()
    assert server.port != 0
    with server.connect() as client:
        assert client.getpeername()[1] == server.port
        assert roundtrip(client, b"ping\n") == b"ping\n"


# ---- line mode -------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    b"hello\n", b"with crlf\r\n", b"  leading and trailing blanks \t\n", b"\tx\r\n",
    "unicode \u00e9\u4e2d\n".encode(), b"bare\rcarriage return\n",
])
def test_line_is_echoed_byte_for_byte(echo, line):
    """A complete line comes back exactly, terminator included."""
    server = echo()
    with server.connect() as client:
        assert roundtrip(client, line) == line
        assert roundtrip(client, line) == line  # and the connection goes on


def test_many_lines_in_one_send(echo):
    """Many lines sent in one write are all echoed, in order."""
    server = echo()
    lines = b"".join(b"line %d%s" % (i, b"\r\n" if i % 3 else b"\n") for i in range(2000))
    with server.connect() as client:
        assert roundtrip(client, lines) == lines


def test_one_line_split_over_many_sends(echo):
    """A line sent a byte at a time is echoed whole, with its \\r\\n."""
    server = echo()
    line = b"split over many sends, even its terminator\r\n"
    with server.connect() as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(line)):
            client.sendall(line[i:i + 1])
        assert recv_exactly(client, len(line)) == line
        assert roundtrip(client, b"next\n") == b"next\n"


def test_lines_cut_at_random_places(echo):
    """A stream of lines cut into random pieces comes back unchanged."""
    server = echo()
    rng = random.Random(7)
    stream = b"".join(b"x" * rng.randrange(1, 300) + rng.choice([b"\n", b"\r\n"])
                      for _ in range(300))
    with server.connect() as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 700)
            client.sendall(stream[pos:pos + step])
            pos += step
        assert recv_exactly(client, len(stream)) == stream


@pytest.mark.parametrize("blank", BLANK_LINES)
def test_blank_line_flushes_then_closes(echo, blank):
    """Lines before a blank line are echoed, then the server closes; later bytes are not."""
    server = echo()
    with server.connect() as client:
        client.sendall(b"one\r\ntwo\n" + blank + b"after the blank line\n")
        data, how = recv_until_closed(client)
    assert (data, how) == (b"one\r\ntwo\n", "eof")


@pytest.mark.parametrize("blank", BLANK_LINES)
def test_blank_line_in_its_own_send_closes(echo, blank):
    """A blank line after an echoed exchange closes the connection (the client reads EOF)."""
    server = echo()
    with server.connect() as client:
        assert roundtrip(client, b"first\n") == b"first\n"
        client.sendall(blank)
        assert recv_until_closed(client) == (b"", "eof")
        # the server goes on serving others
        with server.connect() as other:
            assert roundtrip(other, b"still here\n") == b"still here\n"


def test_eof_echoes_pending_partial_line(echo):
    """At EOF the unfinished last line is echoed, then the connection closes."""
    server = echo()
    with server.connect() as client:
        client.sendall(b"complete\nno newline at the end")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_closed(client) == (b"complete\nno newline at the end", "eof")


def test_eof_echoes_a_long_partial_line(echo):
    """A long unfinished line (read over many recv calls) is echoed whole at EOF."""
    server = echo()
    partial = b"p" * 60000
    with server.connect() as client:
        assert echo_through(client, partial) == partial


def test_eof_after_blank_only_partial_echoes_nothing_more(echo):
    """A whitespace-only last line at EOF is not echoed; what came before is."""
    server = echo()
    with server.connect() as client:
        client.sendall(b"kept\n  \t")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_closed(client) == (b"kept\n", "eof")


def test_eof_with_nothing_pending_closes(echo):
    """EOF right after complete lines closes the connection with nothing more sent."""
    server = echo()
    with server.connect() as client:
        assert roundtrip(client, b"a\n") == b"a\n"
        client.shutdown(socket.SHUT_WR)
        assert recv_until_closed(client) == (b"", "eof")


@pytest.mark.parametrize("pieces", [1, 10], ids=["one-send", "ten-sends"])
def test_line_over_max_line_closes_only_that_connection(echo, pieces):
    """A line longer than --max-line without a newline closes its connection, no other."""
    server = echo("--max-line", "100")
    with server.connect() as victim, server.connect() as bystander:
        assert roundtrip(victim, b"short line\n") == b"short line\n"
        assert roundtrip(bystander, b"before\n") == b"before\n"
        long_line = b"L" * 1000
        step = len(long_line) // pieces
        try:
            for i in range(0, len(long_line), step):
                victim.sendall(long_line[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: also a close
        data, _ = recv_until_closed(victim)
        assert data == b""
        assert roundtrip(bystander, b"after\n") == b"after\n"
        assert roundtrip(bystander, b"y" * 99 + b"\n") == b"y" * 99 + b"\n"


def test_garbage_bytes_are_echoed_and_disturb_no_one(echo):
    """Binary lines with NUL and 0xff are echoed exactly; another client is unaffected."""
    server = echo()
    rng = random.Random(11)
    lines = []
    for i in range(200):
        body = rng.randbytes(rng.randrange(0, 500)).replace(b"\n", b"\x00")
        lines.append(b"\x00\xff" + body + (b"\r\n" if i % 2 else b"\n"))
    garbage = b"".join(lines)
    assert b"\x00" in garbage and b"\xff" in garbage
    with server.connect() as dirty, server.connect() as clean:
        assert roundtrip(clean, b"clean 1\n") == b"clean 1\n"
        dirty.sendall(garbage)
        assert roundtrip(clean, b"clean 2\n") == b"clean 2\n"
        assert recv_exactly(dirty, len(garbage)) == garbage
        assert roundtrip(dirty, b"text after garbage\n") == b"text after garbage\n"
        assert roundtrip(clean, b"clean 3\n") == b"clean 3\n"


# ---- raw mode --------------------------------------------------------------------------

def test_raw_mode_echoes_a_large_payload_exactly(echo):
    """Several MiB of random bytes come back identical (sha256), then EOF closes."""
    server = echo("--mode", "raw")
    payload = random_bytes(6 * 1024 * 1024, seed=3)
    with server.connect(timeout=20) as client:
        received = echo_through(client, payload)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_raw_mode_ignores_lines_and_flushes_at_eof(echo):
    """Raw mode does not stop at blank lines; at EOF it flushes the rest and closes."""
    server = echo("--mode", "raw")
    with server.connect() as client:
        assert roundtrip(client, b"a\n\n\r\n  \nb") == b"a\n\n\r\n  \nb"
        assert roundtrip(client, b"\x00\xff no newline") == b"\x00\xff no newline"
        client.sendall(b"last bytes")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_closed(client) == (b"last bytes", "eof")


# ---- addresses -------------------------------------------------------------------------

def test_ipv6_loopback(echo):
    """--host ::1 binds IPv6, the ready line shows [::1]:PORT, and echo works."""
    server = echo("--host", "::1")
    assert f"listening on [::1]:{server.port} " in server.ready_line
    with socket.create_connection(("::1", server.port), timeout=5) as client:
        assert client.family == socket.AF_INET6
        assert roundtrip(client, b"over ipv6\n") == b"over ipv6\n"


def test_bracketed_ipv6_host(echo):
    """--host [::1] (the form URLs use) binds ::1 and the ready line shows [::1]:PORT."""
    server = echo("--host", "[::1]")
    assert f"listening on [::1]:{server.port} " in server.ready_line
    with socket.create_connection(("::1", server.port), timeout=5) as client:
        assert roundtrip(client, b"bracketed\n") == b"bracketed\n"


@pytest.mark.parametrize("extra", [(), ("--workers", "2"), ("--processes", "2")],
                         ids=["plain", "workers", "processes"])
def test_unresolvable_host_exits_1_naming_it(handler_kind, extra):
    """A host name that does not resolve: exit 1, one line that says so and names it."""
    result = run_echo("--handler", handler_kind, "--host", "no-such-host.invalid", *extra)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "no-such-host.invalid" in lines[0] and "resolve" in lines[0], lines[0]


def test_unix_socket_path(echo):
    """--host /path/x.sock serves on a Unix socket and the ready line names the path."""
    with tempfile.TemporaryDirectory(prefix="kqf", dir="/tmp") as tmp:
        path = str(Path(tmp) / "x.sock")
        server = echo("--host", path)
        assert f"listening on {path} " in server.ready_line
        assert server.path == path
        with server.connect() as client:
            assert client.family == socket.AF_UNIX
            assert roundtrip(client, b"over a unix socket\n") == b"over a unix socket\n"
            client.sendall(b"\n")
            assert recv_until_closed(client) == (b"", "eof")


def test_several_workers_serve(echo):
    """With --workers 2 every client is served, whichever loop accepts it."""
    server = echo("--workers", "2")
    clients = [server.connect() for _ in range(8)]
    try:
        for i, client in enumerate(clients):
            assert roundtrip(client, b"client %d\n" % i) == b"client %d\n" % i
    finally:
        for client in clients:
            client.close()


# ---- signals and exit codes ------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_with_exit_0_and_closes_the_port(echo, sig):
    """SIGINT/SIGTERM: a connected client's connection ends, exit code 0, port closed."""
    server = echo()
    with server.connect() as client:
        assert roundtrip(client, b"before the signal\n") == b"before the signal\n"
        server.proc.send_signal(sig)
        data, _ = recv_until_closed(client)
        assert data == b""
    code, err = server.stop(sig=None, timeout=10)
    assert code == 0, err
    assert "Traceback" not in err
    assert connect_refused((server.host, server.port))


@pytest.mark.parametrize("args", [
    ("--port", "abc"), ("--port", "70000"), ("--port", "-1"), ("--mode", "foo"),
    ("--workers", "0"), ("--handler", "rust"), ("--idle-timeout", "-1"),
], ids=lambda a: " ".join(a))
def test_bad_arguments_exit_2_with_usage(handler_kind, args):
    """Bad arguments exit with code 2 and a usage message on stderr, never a traceback."""
    result = run_echo("--handler", handler_kind, *args)
    assert result.returncode == 2, result.stderr
    assert "usage: kqfast-echo" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--port", "abc", "--port: 'abc' is not a port number (0-65535)"),
    ("--port", "70000", "--port: '70000' is not a port number (0-65535)"),
    ("--port", "", "--port: '' is not a port number (0-65535)"),
    ("--workers", "two", "--workers: 'two' is not a whole number"),
    ("--idle-timeout", "soon", "--idle-timeout: 'soon' is not a number of seconds"),
])
def test_bad_value_message_says_what_is_expected(option, value, message):
    """A malformed value is named with what the option expects, not argparse's internals."""
    result = run_echo(option, value)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "invalid" not in result.stderr


def test_version_prints_the_package_version():
    """--version prints kqfast-echo and kqfast.__version__, and exits 0."""
    result = run_echo("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"kqfast-echo {kqfast.__version__}\n"


HELP_DEFAULTS = {
    "--host": "127.0.0.1", "--port": "8080", "--mode": "line", "--handler": "native",
    "--workers": "1", "--processes": "1", "--backlog": "1024",
    "--max-connections": str(default_max_connections()), "--max-line": "65536",
    "--idle-timeout": "60", "--shutdown-timeout": "5", "--tls-cert": "none",
    "--tls-key": "none",
}


def test_help_shows_every_default():
    """--help gives every option's default, and exits 0."""
    result = run_echo("--help")
    assert result.returncode == 0, result.stderr
    # An option's entry: its line "  --name ..." and the more indented lines after it.
    entry = re.compile(r"^  (?:-\w, )?(--[\w-]+).*(?:\n   .*)*", re.M)
    entries = {match[1]: " ".join(match[0].split()) for match in entry.finditer(result.stdout)}
    assert set(entries) == set(HELP_DEFAULTS) | {"--help", "--version"}, result.stdout
    for option, default in HELP_DEFAULTS.items():
        assert re.search(rf"\(default {re.escape(default)}\b", entries[option]), entries[option]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_shutdown_is_logged(echo, sig):
    """The signal that stops the server and the end of the stop each get a stderr line."""
    server = echo()
    code, err = server.stop(sig=sig)
    assert code == 0, err
    assert err.splitlines() == [f"kqfast-echo: shutting down ({sig.name})",
                                "kqfast-echo: stopped"]


def test_address_in_use_exits_1_with_one_line(handler_kind):
    """A port already listened on: exit 1, one line on stderr naming the cause."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        result = run_echo("--handler", handler_kind, "--port", str(port))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "address already in use" in lines[0].lower()
    assert "listening on" not in result.stderr


def test_unusable_unix_path_exits_1_with_one_line(handler_kind):
    """A Unix socket path in a missing directory: exit 1, one line naming the cause."""
    with tempfile.TemporaryDirectory(prefix="kqf", dir="/tmp") as tmp:
        path = str(Path(tmp) / "missing" / "x.sock")
        result = run_echo("--handler", handler_kind, "--host", path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "no such file" in lines[0].lower()


# ---- timeouts and limits ---------------------------------------------------------------

def test_idle_timeout_closes_a_silent_client_only(echo):
    """--idle-timeout 1 closes a silent client while a chatty one is kept."""
    server = echo("--idle-timeout", "1")
    with server.connect() as silent, server.connect() as chatty:
        started = time.monotonic()
        assert roundtrip(silent, b"then silence\n") == b"then silence\n"
        closed_after = None
        i = 0
        while closed_after is None or time.monotonic() - started < 1.6:
            assert roundtrip(chatty, b"chat %d\n" % i) == b"chat %d\n" % i
            i += 1
            if closed_after is None and select.select([silent], [], [], 0.25)[0]:
                assert recv_until_closed(silent)[0] == b""
                closed_after = time.monotonic() - started
            elif closed_after is not None:
                time.sleep(0.25)  # keep chatting at the pace the silent client was given
            assert time.monotonic() - started < 5, "the silent client was never closed"
        assert 0.8 <= closed_after < 4
        assert roundtrip(chatty, b"still served\n") == b"still served\n"


def test_idle_timeout_0_keeps_silent_clients(echo):
    """--idle-timeout 0 disables the timeout: a client silent for 1.5 s is still served."""
    server = echo("--idle-timeout", "0")
    with server.connect() as client:
        assert roundtrip(client, b"hello\n") == b"hello\n"
        assert select.select([client], [], [], 1.5)[0] == []  # nothing, not even EOF
        assert roundtrip(client, b"still here\n") == b"still here\n"


def test_max_connections_sheds_the_extra_client_at_once(echo):
    """--max-connections 2: a third client is closed promptly; a freed slot serves anew."""
    server = echo("--max-connections", "2")
    first, second = server.connect(), server.connect()
    try:
        assert roundtrip(first, b"first\n") == b"first\n"
        assert roundtrip(second, b"second\n") == b"second\n"
        started = time.monotonic()
        try:
            third = server.connect()
        except ConnectionResetError:
            pass  # shed before connect() even returned
        else:
            with third:
                data, _ = recv_until_closed(third)
            assert data == b""
        assert time.monotonic() - started < 2
        first.sendall(b"\n")  # a blank line: the server closes the first client
        assert recv_until_closed(first) == (b"", "eof")
        first.close()
        # The loop handles the first client's close before this round trip comes back.
        assert roundtrip(second, b"barrier\n") == b"barrier\n"
        with server.connect() as fourth:
            assert roundtrip(fourth, b"fourth\n") == b"fourth\n"
    finally:
        first.close()
        second.close()


def shed(server) -> None:
    """Connects a client that the server, at its connection limit, closes at once."""
    try:
        with server.connect() as client:
            assert recv_until_closed(client)[0] == b""
    except ConnectionResetError:
        pass  # shed before connect() even returned


REJECTED = re.compile(r"kqfast-echo: (\d+) new clients? closed at once: over the connection "
                      r"limit \(--max-connections 1\)")


def test_rejected_clients_are_warned_at_most_every_5_s(echo):
    """Clients closed over --max-connections get a stderr warning soon, with their count;
    the ones that follow are counted into the next warning, at least 5 s later."""
    server = echo("--max-connections", "1")
    reader = LineReader(server.proc.stderr)
    with server.connect() as kept:
        assert roundtrip(kept, b"kept\n") == b"kept\n"
        shed(server)
        first = REJECTED.fullmatch(reader.expect("kqfast-echo: ", timeout=5))
        first_seen = time.monotonic()
        assert first and first[1] == "1", reader.seen
        for _ in range(3):
            shed(server)
        second = REJECTED.fullmatch(reader.expect("kqfast-echo: ", timeout=10))
        assert second and second[1] == "3", reader.seen
        assert time.monotonic() - first_seen > 4.5
        assert roundtrip(kept, b"still served\n") == b"still served\n"


# ---- graceful shutdown -----------------------------------------------------------------

def send_without_reading(client: socket.socket, payload: bytes) -> int:
    """Sends as much of payload as the connection takes without blocking; returns the count."""
    client.setblocking(False)
    sent = 0
    try:
        while sent < len(payload):
            sent += client.send(payload[sent:sent + 65536])
    except BlockingIOError:
        pass
    finally:
        client.settimeout(10)
    return sent


def test_sigterm_with_pending_output_flushes_and_exits_0(echo):
    """SIGTERM while a client owes reading: it still reads what was echoed, up to a clean
    EOF, and the server exits 0 within --shutdown-timeout plus a margin."""
    server = echo("--mode", "raw", "--shutdown-timeout", "2")
    payload = random_bytes(8 * 1024 * 1024, seed=5)
    # A small receive buffer: the server's output backs up soon.
    with connect_to((server.host, server.port), timeout=10, rcvbuf=32768) as client:
        assert roundtrip(client, b"warm up") == b"warm up"
        sent = send_without_reading(client, payload)
        # The server has read and echoed part of the payload (it waits in our buffer).
        assert select.select([client], [], [], 5)[0] == [client]
        sent += send_without_reading(client, payload[sent:])
        stopped_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        received, how = recv_until_closed(client)
        assert how == "eof"
        assert 0 < len(received) <= sent
        assert received == payload[:len(received)]
    code, err = server.stop(sig=None, timeout=10)
    assert code == 0, err
    assert time.monotonic() - stopped_at < 2 + 3
    assert "Traceback" not in err


def test_shutdown_timeout_bounds_a_client_that_never_reads(echo):
    """SIGTERM with a client that never reads: exit 0 within --shutdown-timeout + margin."""
    server = echo("--mode", "raw", "--shutdown-timeout", "1")
    with server.connect() as client:
        assert roundtrip(client, b"warm up") == b"warm up"
        assert send_without_reading(client, random_bytes(8 * 1024 * 1024, seed=6)) > 0
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code, err = server.stop(sig=None, timeout=10)
        assert time.monotonic() - started < 1 + 3
    assert code == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_shutdown_closes_an_idle_client_at_once_with_a_fin(echo, sig):
    """A client that is owed nothing and sends nothing is closed at once at shutdown: it
    reads EOF, the server exits without lingering for it (linger_timeout, 2 s), and no reset
    ever follows the FIN."""
    server = echo("--shutdown-timeout", "30")
    with server.connect(timeout=10) as client:
        assert roundtrip(client, b"hello\n") == b"hello\n"
        server.proc.send_signal(sig)
        assert client.recv(16) == b""  # the FIN
        code, err = server.stop(sig=None, timeout=10)
        assert code == 0, err
        # After the server is gone: a linger that gave up would have reset us by now.
        assert client.recv(16) == b""
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
