"""kqfast-echo --processes: pre-forked children that start, share a port with no one else,
and are logged and replaced when they die (kqfast._prefork)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from support import (
    LineReader, connect_refused, recv_until_closed, roundtrip, run_echo_expecting_exit,
    tcp_sockets, wait_until,
)

TIME_WAIT = "06"
REPLACED = re.compile(r"kqfast-echo: process (\d+) killed by SIGKILL; replaced by process (\d+)$")

# One child of two kills itself before it reports ready (whichever reads the pipe's only
# byte first); the other reports ready and waits to be stopped.
DIES_BEFORE_READY = textwrap.dedent("""
    import os, signal, sys
    from kqfast._prefork import ProcessGroup

    token_r, token_w = os.pipe()
    os.write(token_w, b"x")
    os.close(token_w)

    def serve_child(ready):
        if os.read(token_r, 1):
            os.kill(os.getpid(), signal.SIGKILL)
        ready()
        signal.pause()
        return 0

    def log(line):
        print("LOG", line, flush=True)

    group = ProcessGroup(2, serve_child, log)
    print("STARTED", group.start(), group.failure, flush=True)
    group.stop()
    print("STATUS", group.supervise(), flush=True)
""")


def test_a_child_dying_before_ready_ends_the_start():
    """start() returns False (rather than waiting forever) when a child dies before it says
    ready, names that child's fate, and the group then stops its other children."""
    proc = subprocess.Popen([sys.executable, "-c", DIES_BEFORE_READY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and the child that became ready
        proc.communicate()
        pytest.fail("ProcessGroup.start() never returned after a child died before ready")
    assert proc.returncode == 0, err
    started = re.search(r"^STARTED False process (\d+) killed by SIGKILL before it was ready$",
                        out, re.M)
    assert started, out
    assert "STATUS 1" in out, out


def test_processes_start_while_an_earlier_run_leaves_time_wait(echo_server):
    """--processes 2 on the port of a plain run that just served clients (its connections
    now in TIME_WAIT) starts at once instead of failing with "Address already in use"."""
    plain = echo_server()
    for _ in range(3):
        with plain.connect() as client:
            assert roundtrip(client, b"ping\n") == b"ping\n"
            client.sendall(b"\n")  # a blank line: the server closes first, so TIME_WAIT
            assert recv_until_closed(client) == (b"", "eof")
    code, err = plain.stop()
    assert code == 0, err
    assert any(state == TIME_WAIT for _, _, state in tcp_sockets(plain.port))
    group = echo_server("--port", str(plain.port), "--processes", "2")
    assert group.port == plain.port
    with group.connect() as client:
        assert roundtrip(client, b"after time-wait\n") == b"after time-wait\n"


SHARING = {"processes": ("--processes", "2"), "workers": ("--workers", "2")}


@pytest.mark.parametrize("first", SHARING)
@pytest.mark.parametrize("second", SHARING)
def test_a_port_held_by_another_server_is_refused(echo_server, first, second):
    """A second kqfast-echo that would share its port through SO_REUSEPORT with one already
    serving there (and silently take half its clients) exits 1 with one address-in-use line;
    the first serves on."""
    holder = echo_server(*SHARING[first])
    result = run_echo_expecting_exit("--port", str(holder.port), *SHARING[second])
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "address already in use" in lines[0].lower(), result.stderr
    assert f":{holder.port}" in lines[0]
    for _ in range(10):
        with holder.connect() as client:
            assert roundtrip(client, b"still mine\n") == b"still mine\n"


def listening_children(server) -> list[psutil.Process]:
    """The server's child processes that have their listener open on its port."""
    def listens(child: psutil.Process) -> bool:
        # psutil before 6.0 names it connections()
        sockets = getattr(child, "net_connections", None) or child.connections
        try:
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
                       for c in sockets("tcp"))
        except psutil.NoSuchProcess:
            return False
    return [c for c in psutil.Process(server.proc.pid).children() if listens(c)]


def test_a_killed_child_is_logged_and_replaced(echo_server):
    """A SIGKILLed child: one stderr line names its pid and the signal, a new child takes its
    place and listens, every client is served, and SIGTERM still ends it all with status 0
    and one shutdown line."""
    server = echo_server("--processes", "2")
    reader = LineReader(server.proc.stderr)
    children = psutil.Process(server.proc.pid).children()
    assert len(children) == 2
    children[0].kill()
    replaced = REPLACED.match(reader.expect("kqfast-echo: process", timeout=10))
    assert replaced, reader.seen
    assert int(replaced[1]) == children[0].pid
    new_pid = int(replaced[2])
    assert wait_until(lambda: {c.pid for c in listening_children(server)}
                      == {children[1].pid, new_pid}, timeout=10)
    clients = [server.connect() for _ in range(20)]
    for i, client in enumerate(clients):
        assert roundtrip(client, b"line %d\n" % i) == b"line %d\n" % i
        client.close()
    server.proc.send_signal(signal.SIGTERM)
    reader.expect("kqfast-echo: shutting down (SIGTERM)")
    reader.expect("kqfast-echo: stopped", timeout=10)
    assert server.proc.wait(timeout=10) == 0
    assert not [line for line in reader.seen if "shutting down" in line][1:], reader.seen
    assert connect_refused((server.host, server.port))


def test_children_dying_in_a_loop_stop_the_group_with_the_cause(echo_server):
    """Children killed one after the other are replaced only up to a rate limit; then the
    group stops, exits 1 and its last line says why."""
    server = echo_server("--processes", "2")
    reader = LineReader(server.proc.stderr)
    victim = psutil.Process(server.proc.pid).children()[0].pid
    for _ in range(20):
        os.kill(victim, signal.SIGKILL)
        line = reader.expect("kqfast-echo: ", timeout=10)
        replaced = REPLACED.match(line)
        if replaced is None:
            break
        victim = int(replaced[2])
    else:
        pytest.fail(f"20 children killed in a row, all replaced: {reader.seen[-3:]}")
    assert server.proc.wait(timeout=15) == 1
    assert re.match(rf"kqfast-echo: process {victim} killed by SIGKILL: \d+ children died "
                    r"within \d+ s; stopping$", line), reader.seen
    assert len(reader.seen) > 2  # some were replaced before the limit


def test_children_stop_when_the_parent_is_killed(echo_server):
    """A SIGKILLed parent, which cannot stop its children itself, leaves none serving on."""
    server = echo_server("--processes", "2")
    children = psutil.Process(server.proc.pid).children()
    server.proc.kill()
    server.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    assert connect_refused((server.host, server.port))
