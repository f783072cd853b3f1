"""The poller on its own, through kqfast._core.Poller: set(fd, old_mask, new_mask),
wait(timeout) -> [(fd, mask, err)], wake(), close(), on real socket pairs."""
from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from kqfast._core import BACKEND, ERROR, HANGUP, READABLE, WRITABLE, Poller
from support import tcp_pair


@pytest.fixture
def poller():
    """A fresh Poller, closed at the end."""
    p = Poller()
    yield p
    p.close()


@pytest.fixture(params=["unix", "tcp"])
def pair(request):
    """A connected pair of sockets (a, b): a Unix socketpair, or two TCP sockets on loopback."""
    if request.param == "unix":
        a, b = socket.socketpair()
    else:
        a, b = tcp_pair()
    for s in (a, b):
        s.settimeout(5)
    yield a, b
    a.close()
    b.close()


def masks(events) -> dict[int, int]:
    """The events of one wait, merged per fd (a backend may report read and write apart)."""
    merged: dict[int, int] = {}
    for fd, mask, _err in events:
        merged[fd] = merged.get(fd, 0) | mask
    return merged


def test_masks_are_distinct_bits():
    """READABLE, WRITABLE, HANGUP and ERROR are four different bits."""
    bits = [READABLE, WRITABLE, HANGUP, ERROR]
    assert all(b and b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == 4


def test_nothing_readable_means_no_event(poller, pair):
    """With read interest and nothing to read, wait(0.05) returns []."""
    a, _ = pair
    poller.set(a.fileno(), 0, READABLE)
    assert poller.wait(0.05) == []
    assert poller.wait(0) == []


def test_peer_write_makes_fd_readable(poller, pair):
    """Bytes from the peer make the fd readable, as one event for it with err 0."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    b.sendall(b"ping")
    events = poller.wait(5)
    assert [(fd, err) for fd, _, err in events] == [(a.fileno(), 0)]
    assert events[0][1] & READABLE
    assert not events[0][1] & (WRITABLE | HANGUP | ERROR)
    assert a.recv(10) == b"ping"


def test_readiness_is_level_triggered(poller, pair):
    """Unread bytes are reported on every wait until they are read."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    b.sendall(b"still there")
    for _ in range(3):
        assert masks(poller.wait(5)).get(a.fileno(), 0) & READABLE
    assert a.recv(100) == b"still there"
    assert poller.wait(0.05) == []


def test_modify_to_write_interest(poller, pair):
    """Moving interest from READABLE to WRITABLE reports writability and no longer reads."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    b.sendall(b"unread")
    poller.set(a.fileno(), READABLE, WRITABLE)
    got = masks(poller.wait(5))
    assert set(got) == {a.fileno()}
    assert got[a.fileno()] & WRITABLE
    assert not got[a.fileno()] & READABLE


def test_read_and_write_interest_together(poller, pair):
    """With both interests, a readable and writable fd reports both bits."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE | WRITABLE)
    b.sendall(b"x")
    got = {}
    # kqueue reports its two filters apart; they may land in separate waits.
    for _ in range(2):
        for fd, mask in masks(poller.wait(5)).items():
            got[fd] = got.get(fd, 0) | mask
        if got.get(a.fileno(), 0) & (READABLE | WRITABLE) == READABLE | WRITABLE:
            break
    assert got == {a.fileno(): READABLE | WRITABLE}


def test_write_interest_waits_for_room(poller, pair):
    """A full send buffer is not writable; it becomes so once the peer drains it."""
    a, b = pair
    a.setblocking(False)
    try:
        while True:
            a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    poller.set(a.fileno(), 0, WRITABLE)
    assert poller.wait(0.05) == []
    b.setblocking(False)
    drained = 0
    deadline = time.monotonic() + 5
    while True:
        try:
            drained += len(b.recv(1 << 20))
        except BlockingIOError:
            got = masks(poller.wait(0.05))
            if got.get(a.fileno(), 0) & WRITABLE:
                break
        assert time.monotonic() < deadline, "never writable after the peer read everything"
    assert drained > 0


def test_delete_interest_means_no_events(poller, pair):
    """New mask 0 removes the fd: its readiness is no longer reported."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    b.sendall(b"ignored")
    poller.set(a.fileno(), READABLE, 0)
    assert poller.wait(0.05) == []


def test_only_ready_fds_are_reported(poller):
    """Among many watched fds, exactly those whose peer wrote are reported."""
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        for a, _ in pairs:
            poller.set(a.fileno(), 0, READABLE)
        for a, b in pairs[::3]:
            b.sendall(b"!")
        expected = {a.fileno() for a, _ in pairs[::3]}
        got = masks(poller.wait(5))
        assert set(got) == expected
        assert all(mask & READABLE for mask in got.values())
    finally:
        for a, b in pairs:
            poller.set(a.fileno(), READABLE, 0)
            a.close()
            b.close()


def test_timeout_is_honoured(poller, pair):
    """wait(0.2) with nothing ready returns [] after about 0.2 s, not before."""
    a, _ = pair
    poller.set(a.fileno(), 0, READABLE)
    started = time.monotonic()
    assert poller.wait(0.2) == []
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 1.5


def test_wake_from_another_thread_ends_wait_none(poller):
    """wake() from another thread makes a wait(None) in progress return []."""
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(poller.wait(None)), daemon=True)
    waiter.start()
    waker = threading.Timer(0.1, poller.wake)  # let the wait block first
    waker.start()
    waiter.join(5)
    waker.join()
    assert not waiter.is_alive(), "wait(None) never returned after wake()"
    assert result == [[]]


def test_wake_before_wait_is_kept_then_consumed(poller):
    """Wakes made before a wait end it at once; they coalesce into one and are consumed."""
    poller.wake()
    poller.wake()
    poller.wake()
    started = time.monotonic()
    assert poller.wait(5) == []
    assert time.monotonic() - started < 1
    started = time.monotonic()
    assert poller.wait(0.1) == []
    assert time.monotonic() - started >= 0.09  # no wake-up left over


def test_peer_close_with_buffered_data(poller, pair):
    """Peer closing after writing: READABLE and HANGUP, and the data is read before EOF."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    b.sendall(b"last words")
    b.close()
    got = masks(poller.wait(5))
    assert set(got) == {a.fileno()}
    assert got[a.fileno()] & READABLE
    assert got[a.fileno()] & HANGUP
    assert a.recv(100) == b"last words"
    assert a.recv(100) == b""


def test_peer_shutdown_write_reports_hangup(poller, pair):
    """The peer's shutdown(SHUT_WR) with data pending: READABLE|HANGUP, data still there."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    b.sendall(b"half closed")
    b.shutdown(socket.SHUT_WR)
    got = masks(poller.wait(5))
    assert got.get(a.fileno(), 0) & (READABLE | HANGUP) == READABLE | HANGUP
    assert a.recv(100) == b"half closed"
    assert a.recv(100) == b""
    a.sendall(b"reply")  # the other direction is still open
    assert b.recv(100) == b"reply"


def test_remove_then_close_then_reuse_the_number(poller):
    """Removing then closing an fd works, and a new socket with that number is added anew."""
    a, b = socket.socketpair()
    fd = a.fileno()
    poller.set(fd, 0, READABLE)
    b.sendall(b"x")
    poller.set(fd, READABLE, 0)
    a.close()
    b.close()
    assert poller.wait(0.05) == []
    held = []  # new sockets take the lowest free numbers: fill the gaps below fd
    try:
        while True:
            c, d = socket.socketpair()
            held += [c, d]
            if fd in (c.fileno(), d.fileno()):
                break
            assert len(held) < 400, f"fd {fd} never came back"
        mine, peer = (c, d) if c.fileno() == fd else (d, c)
        poller.set(fd, 0, READABLE)
        peer.sendall(b"new")
        got = masks(poller.wait(5))
        assert set(got) == {fd} and got[fd] & READABLE
        assert mine.recv(10) == b"new"
        poller.set(fd, READABLE, 0)
    finally:
        for s in held:
            s.close()


def test_interest_on_a_closed_fd_raises_oserror(poller):
    """Setting interest on a closed fd raises OSError (at once or, when the backend batches
    changes, from the next wait) instead of being silently dropped."""
    s = socket.socket()
    fd = s.fileno()
    s.close()
    with pytest.raises(OSError):
        poller.set(fd, 0, READABLE)
        events = poller.wait(0)
        # A batching backend may instead report the refusal as an ERROR event for the fd.
        for efd, mask, err in events:
            if efd == fd and mask & ERROR and err:
                raise OSError(err, "reported as an event")


def test_changes_of_one_iteration_merge(poller, pair):
    """Write interest added and taken back before a wait is as if it never was: the wait
    reports readability only (a queueing backend applies the net change, or none)."""
    a, b = pair
    poller.set(a.fileno(), 0, READABLE)
    poller.set(a.fileno(), READABLE, READABLE | WRITABLE)
    poller.set(a.fileno(), READABLE | WRITABLE, READABLE)
    b.sendall(b"x")
    got = masks(poller.wait(5))
    assert got == {a.fileno(): READABLE}


def test_refused_queued_change_is_an_error_event(poller):
    """A queued change that the kernel refuses when the wait applies it (here: the fd was
    closed behind the poller's back) comes back from that wait as an ERROR event for the fd
    with the errno, never as readiness; a backend that applies it at once raises instead."""
    a, b = socket.socketpair()
    fd = a.fileno()
    try:
        poller.set(fd, 0, READABLE)
        a.close()
        try:
            poller.set(fd, READABLE, READABLE | WRITABLE)
        except OSError as exc:
            assert exc.errno in (errno.EBADF, errno.ENOENT)
            return
        got = [(mask, err) for efd, mask, err in poller.wait(0) if efd == fd]
        if BACKEND == "epoll":  # libkqueue takes such a change without a word
            assert len(got) == 1
        assert all(mask == ERROR and err in (errno.EBADF, errno.ENOENT) for mask, err in got)
        assert poller.wait(0) == []  # reported once
    finally:
        poller.set(fd, READABLE | WRITABLE, 0)
        b.close()


def test_closed_poller_refuses_calls():
    """After close(), set/wait/wake raise ValueError; close() again is harmless."""
    p = Poller()
    p.close()
    p.close()
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError):
            p.set(a.fileno(), 0, READABLE)
        with pytest.raises(ValueError):
            p.wait(0)
        with pytest.raises(ValueError):
            p.wake()
    finally:
        a.close()
        b.close()
