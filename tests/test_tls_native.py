"""TLS on kqfast.Server and kqfast-echo: the native handlers serve TLS entirely in C (the
handshake, records, close_notify), kqfast.Server's protocols get asyncio's TLS on the engine,
and the arguments are checked up front."""
from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import subprocess
import threading
from asyncio import sslproto

import pytest

import kqfast
from support import memory_bio_client, run_echo_expecting_exit

pytestmark = pytest.mark.timeout(60)


def tls_client(context, address, timeout=10.0) -> ssl.SSLSocket:
    sock = socket.create_connection(address, timeout=timeout)
    return context.wrap_socket(sock, server_hostname="localhost")


def read_to_close_notify(sock: ssl.SSLSocket) -> bytes:
    """Everything until the server's close_notify (which ssl reads as b""), then the
    closing handshake back."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def exchange(context, address, payload: bytes) -> tuple[bytes, bool]:
    """Sends payload over TLS and reads the echo, in one thread (an ssl object is not for two
    at once): the records go out as the socket takes them while the echo comes back.  Then
    close_notify; returns (the echo, whether the server's close_notify came)."""
    sock, tls, incoming, outgoing = memory_bio_client(context, address)
    tls.write(payload)
    wire, echoed, closed = memoryview(outgoing.read()), bytearray(), False
    sock.setblocking(False)
    while not closed:
        if len(echoed) == len(payload) and not wire:
            with pytest.raises(ssl.SSLWantReadError):
                tls.unwrap()  # close_notify out; the server's answer is read below
            wire = memoryview(outgoing.read())
        readable, writable, _ = select.select([sock], [sock] if wire else [], [], 10)
        assert readable or writable, "stalled"
        if writable:
            wire = wire[sock.send(wire):]
        if readable:
            data = sock.recv(1 << 20)
            if not data:
                break
            incoming.write(data)
            try:
                while chunk := tls.read(1 << 20):
                    echoed += chunk
                closed = True  # b"": the server's close_notify
            except ssl.SSLZeroReturnError:
                closed = True  # the same, after ours
            except ssl.SSLWantReadError:
                pass
    sock.close()
    return bytes(echoed), closed


@pytest.mark.parametrize("size", [1, 16384, 100_000, 4 << 20])
def test_native_echo_over_tls(serve, tls, size):
    """Raw echo: every byte back (4 MiB is past the high-water mark: reading stops and
    resumes); close_notify is answered with the server's own."""
    server = serve(kqfast.ECHO, ssl=tls[0])
    payload = os.urandom(size)
    assert exchange(tls[1], server.address, payload) == (payload, True)


def test_native_line_echo_over_tls(serve, tls):
    """Lines come back byte for byte; a blank line closes with close_notify."""
    server = serve(kqfast.LINE_ECHO, ssl=tls[0])
    with tls_client(tls[1], server.address) as sock:
        sock.sendall(b"hello\r\nwor")
        sock.sendall(b"ld\n\n")
        assert read_to_close_notify(sock) == b"hello\r\nworld\n"


def test_a_handshake_that_fails_closes_only_that_client(serve, tls):
    """Garbage instead of a ClientHello, a client that trusts nobody, a client that resets
    halfway: each ends its own connection (counted as an error) and the server serves on."""
    server = serve(kqfast.ECHO, ssl=tls[0])
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while sock.recv(4096):  # an alert, then the close
            pass
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(ssl.create_default_context(), server.address)
    with socket.create_connection(server.address, timeout=10) as sock:
        outgoing = ssl.MemoryBIO()
        hello = tls[1].wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            hello.do_handshake()
        sock.sendall(outgoing.read()[:40])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    with tls_client(tls[1], server.address) as sock:
        sock.sendall(b"still serving")
        assert sock.recv(100) == b"still serving"
    assert server.stats()["errors"] >= 2


def test_a_graceful_stop_sends_close_notify(serve, tls):
    server = serve(kqfast.ECHO, ssl=tls[0])
    with tls_client(tls[1], server.address) as idle, \
            tls_client(tls[1], server.address) as busy:
        busy.sendall(b"x")
        assert busy.recv(1) == b"x"
        idle.sendall(b"y")
        assert idle.recv(1) == b"y"
        server.stop(timeout=5)
        assert read_to_close_notify(idle) == b""
        assert read_to_close_notify(busy) == b""


def test_protocols_of_a_server_get_asyncios_tls(serve, tls):
    """kqfast.Server with a protocol factory and ssl=: the protocol sees the plaintext and an
    SSL transport (on the engine where it runs)."""
    import asyncio
    seen = {}

    class Upper(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            seen["transport"] = type(transport).__name__
            seen["version"] = transport.get_extra_info("ssl_object").version()

        def data_received(self, data):
            self.transport.write(data.upper())

    server = serve(Upper, ssl=tls[0])
    with tls_client(tls[1], server.address) as sock:
        sock.sendall(b"shout")
        assert sock.recv(100) == b"SHOUT"
    assert "ssl" in seen["transport"].lower() and seen["version"].startswith("TLS")


@pytest.mark.parametrize("value, error, words", [
    ("cert.pem", TypeError, "ssl must be an ssl.SSLContext or None"),
    (ssl.create_default_context(), ValueError, "server-side context"),
])
def test_bad_ssl_arguments_name_the_mistake(value, error, words):
    with pytest.raises(error, match=words):
        kqfast.Server(kqfast.ECHO, port=0, ssl=value)


def test_native_handlers_refuse_a_context_with_python_callbacks(tls):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.sni_callback = lambda *args: None
    with pytest.raises(ValueError, match="ssl.sni_callback is set: native handlers"):
        kqfast.Server(kqfast.LINE_ECHO, port=0, ssl=context)
    kqfast.Server(lambda: None, port=0, ssl=context).stop()  # protocols may have one


def test_kqfast_echo_serves_tls(echo_server, tls_files):
    cert, key, client = tls_files
    server = echo_server("--mode", "line", "--tls-cert", str(cert), "--tls-key", str(key))
    assert server.ready_line.rstrip().endswith("workers=1, tls)")
    with tls_client(client, (server.host, server.port)) as sock:
        sock.sendall(b"over tls\n\n")
        assert read_to_close_notify(sock) == b"over tls\n"
    code, err = server.stop(sig=signal.SIGINT)
    assert code == 0, err


def test_openssl_s_client_is_echoed(echo_server, tls_files):
    cert, key, _ = tls_files
    server = echo_server("--mode", "line", "--tls-cert", str(cert), "--tls-key", str(key))
    done = subprocess.run(["openssl", "s_client", "-quiet", "-connect",
                           f"{server.host}:{server.port}"], input=b"from openssl\n\n",
                          capture_output=True, timeout=20)
    assert done.stdout == b"from openssl\n", done.stderr


def test_kqfast_echo_tls_errors_are_one_line(tmp_path, tls_files):
    cert, key, _ = tls_files
    result = run_echo_expecting_exit("--port", "0", "--tls-cert", str(cert))
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr
    missing = tmp_path / "missing.pem"
    result = run_echo_expecting_exit("--port", "0", "--tls-cert", str(missing), "--tls-key",
                                     str(key))
    assert result.returncode == 1
    assert result.stderr == f"kqfast-echo: cannot read {missing}: No such file or directory\n"
    result = run_echo_expecting_exit("--port", "0", "--tls-cert", str(key), "--tls-key",
                                     str(key))
    assert result.returncode == 1 and result.stderr.startswith(
        f"kqfast-echo: cannot load --tls-cert {key}")


def test_a_line_protocol_over_tls_gets_its_lines(serve, tls):
    """kqfast.LineProtocol on a TLS server: the same lines as over TCP (framed from the
    plaintext), the last one without its newline before eof_received(), and a line over
    max_line ends the connection.  (Python 3.10's asyncio SSLProtocol, on its own loop as on
    kqfast's, answers a peer's close_notify by closing, without eof_received() or a
    close_notify of its own: there the stream just ends.)"""
    modern_sslproto = hasattr(sslproto, "SSLProtocolState")
    seen = []

    class Lines(kqfast.LineProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def line_received(self, line):
            seen.append(line)
            if line.endswith(b"\n"):  # (not the last one, which comes after close_notify)
                self.transport.write(line.upper())

        def eof_received(self):
            seen.append("eof")

        def connection_lost(self, exc):
            seen.append(type(exc).__name__ if exc else None)
            if exc is not None:
                failed.set()

    failed = threading.Event()
    server = serve(Lines, ssl=tls[0], max_line=100)
    with tls_client(tls[1], server.address) as sock:
        sock.sendall(b"one\ntw")
        sock.sendall(b"o\r\nthree")
        echoed = b""
        while len(echoed) < 9:
            echoed += sock.recv(100)
        assert echoed == b"ONE\nTWO\r\n"
        if modern_sslproto:
            sock.unwrap()  # close_notify: the stream's EOF
        else:
            with pytest.raises(ssl.SSLEOFError):
                sock.unwrap()
    with tls_client(tls[1], server.address) as sock:
        sock.sendall(b"x" * 200)
        assert read_to_close_notify(sock) == b""
    assert failed.wait(10)  # (the client may see the close before the server's callback)
    ended = [b"three", "eof", None] if modern_sslproto else [None]
    assert seen == [b"one\n", b"two\r\n", *ended, "OSError"]
