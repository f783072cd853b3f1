"""Several event loops serving one port: SO_REUSEPORT listeners, or one accepting loop that
hands connections to the others (macOS's path, forced here so it runs on Linux too)."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest

import kqfast
from kqfast._echo import EchoProtocol
from support import (
    connect_refused, connect_to, recv_exactly, recv_until_closed, roundtrip,
    run_echo, wait_until,
)

BALANCES = ["reuseport", "handoff"]
HANDLERS = {"native": kqfast.ECHO, "python": EchoProtocol}


@pytest.fixture(params=BALANCES)
def balance(request):
    """Both ways of spreading connections, on whichever backend the build has."""
    return request.param


@pytest.mark.parametrize("kind", HANDLERS)
def test_two_loops_share_200_connections_fairly(serve, balance, kind):
    """200 clients spread over both loops (each 30-70%), every echo right."""
    server = serve(HANDLERS[kind], workers=2, balance=balance)
    clients = [connect_to(server) for _ in range(200)]
    try:
        for i, client in enumerate(clients):
            client.sendall(b"client %d\n" % i)
        for i, client in enumerate(clients):
            assert recv_exactly(client, len(b"client %d\n" % i)) == b"client %d\n" % i
        per_loop = [loop["connections_current"] for loop in server.stats()["loops"]]
        assert sum(per_loop) == 200
        assert all(60 <= n <= 140 for n in per_loop), per_loop
    finally:
        for client in clients:
            client.close()


def test_handoff_is_round_robin(serve):
    """The hand-off path gives each loop exactly its turn."""
    server = serve(kqfast.ECHO, workers=3, balance="handoff")
    clients = [connect_to(server) for _ in range(99)]
    try:
        for client in clients:
            assert roundtrip(client, b"x\n") == b"x\n"
        assert [loop["connections_total"] for loop in server.stats()["loops"]] == [33, 33, 33]
    finally:
        for client in clients:
            client.close()


def test_stats_sum_the_loops(serve, balance):
    """stats() totals are the sums of the per-loop counters."""
    server = serve(kqfast.ECHO, workers=2, balance=balance)
    clients = [connect_to(server) for _ in range(20)]
    for client in clients:
        assert roundtrip(client, b"ping\n") == b"ping\n"
    stats = server.stats()
    for key in ("connections_current", "connections_total", "bytes_in", "bytes_out"):
        assert stats[key] == sum(loop[key] for loop in stats["loops"]), key
    assert stats["connections_total"] == 20
    for client in clients:
        client.close()


@pytest.mark.parametrize("kind", HANDLERS)
def test_graceful_stop_with_connections_on_every_loop(balance, kind):
    """stop() flushes every loop's pending output, then closes: each client gets the echo of
    all the server read, in order, then EOF (no reset), and the port is closed."""
    payload = bytes(range(256)) * 4096  # 1 MiB each, more than the buffers hold unread
    server = kqfast.Server(HANDLERS[kind], port=0, workers=2, balance=balance).start()
    clients = [connect_to(server, rcvbuf=65536) for _ in range(20)]
    for client in clients:
        client.setblocking(False)
        try:
            client.send(payload)
        except BlockingIOError:
            pass
        client.setblocking(True)
    assert wait_until(lambda: all(loop["bytes_out"] for loop in server.stats()["loops"]))
    stopper = threading.Thread(target=server.stop, args=(5.0,))
    stopper.start()
    received = 0
    for client in clients:
        data, end = recv_until_closed(client)
        assert end == "eof" and payload.startswith(data)
        received += len(data)
        client.close()
    stopper.join(10)
    assert not stopper.is_alive()
    assert connect_refused(server.address)
    stats = server.stats()
    assert stats["bytes_in"] == stats["bytes_out"] == received > 0


def test_one_loops_handler_failure_leaves_the_others_serving(serve, balance):
    """A protocol that raises on one loop closes only its connection; both loops serve on."""
    class Picky(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if data.startswith(b"boom"):
                raise ValueError("picky")
            self.transport.write(data)

    server = serve(Picky, workers=2, balance=balance)
    bad = [connect_to(server) for _ in range(10)]
    good = [connect_to(server) for _ in range(10)]
    for client in bad:
        client.sendall(b"boom\n")
    for client in bad:
        assert recv_until_closed(client)[0] == b""  # closed, reset or not: never echoed
    for client in good:
        assert roundtrip(client, b"fine\n") == b"fine\n"
    loops_used = [loop["connections_total"] > 0 for loop in server.stats()["loops"]]
    assert all(loops_used)


def test_reuse_port_is_refused_where_it_does_not_balance_or_works():
    """reuse_port=True either shares the port (Linux, FreeBSD) or fails with a clear OSError
    (macOS, where SO_REUSEPORT sends every connection to one socket)."""
    first = kqfast.Server(kqfast.ECHO, port=0, reuse_port=True)
    try:
        second = kqfast.Server(kqfast.ECHO, port=first.address[1], reuse_port=True)
        second.stop()
    finally:
        first.stop()


def test_processes_share_the_port(echo_server):
    """kqfast-echo --processes 2 --handler python: every client is echoed and SIGTERM ends
    all the children with status 0."""
    server = echo_server("--processes", "2", "--handler", "python")
    assert "processes=2" in server.ready_line
    clients = [server.connect() for _ in range(50)]
    for i, client in enumerate(clients):
        assert roundtrip(client, b"line %d\n" % i) == b"line %d\n" % i
    for client in clients:
        client.close()
    code, _ = server.stop()
    assert code == 0
    assert connect_refused((server.host, server.port))


def test_processes_report_a_port_in_use_once():
    """--processes with a taken port exits 1 with one line naming the cause."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        result = run_echo("--port", str(taken.getsockname()[1]), "--processes", "2")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "in use" in result.stderr
