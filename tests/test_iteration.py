"""kqfast.Loop's iteration in C (iteration.pxi, timer_heap.pxi): it must be asyncio's own, seen
from outside.  The same scenarios run on asyncio's loop and on kqfast's and must record the
same order of ready callbacks, I/O callbacks and timers; code that pokes the loop's _ready and
_scheduled is still honoured; the timer heap is heapq's, item for item; a direct _run_once()
runs one iteration; stop(), KeyboardInterrupt and debug mode behave as asyncio's."""
from __future__ import annotations

import asyncio
import heapq
import logging
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kqfast

pytestmark = pytest.mark.timeout(60)

LOOPS = [pytest.param(asyncio.SelectorEventLoop, id="asyncio"),
         pytest.param(kqfast.new_event_loop, id="kqfast")]


def on_both(scenario):
    """scenario(loop, log) on asyncio's loop and on kqfast's; returns both logs."""
    logs = []
    for make in (asyncio.SelectorEventLoop, kqfast.new_event_loop):
        loop = make()
        log: list = []
        try:
            scenario(loop, log)
        finally:
            loop.close()
        logs.append(log)
    return logs


def test_ready_callbacks_io_and_timers_run_in_asyncio_order():
    """Callbacks ready before the poll, a stream's data, a reader's readiness and timers due,
    each scheduling more: the same order on both loops, iteration by iteration."""
    def scenario(loop, log):
        a, b = socket.socketpair()
        r, w = socket.socketpair()

        class Recorder(asyncio.Protocol):
            def data_received(self, data):
                log.append(("data", data))
                loop.call_soon(log.append, ("soon from data", data))

        async def main():
            await loop.connect_accepted_socket(Recorder, a)
            loop.add_reader(r.fileno(), lambda: log.append(("reader", r.recv(10))))
            for i in range(3):
                loop.call_soon(log.append, ("soon", i))
                loop.call_later(0, log.append, ("timer", i))
                b.send(b"%d" % i)
                w.send(b"%d" % i)
                # One iteration with all of them ready: what it runs, and in which order.
                stop = loop.create_future()
                loop.call_later(0.05, stop.set_result, None)
                await stop
            loop.remove_reader(r.fileno())

        loop.run_until_complete(main())
        for sock in (a, b, r, w):
            sock.close()

    asyncio_log, kqfast_log = on_both(scenario)
    assert io_in_any_order(kqfast_log) == io_in_any_order(asyncio_log)
    assert ("data", b"0") in kqfast_log and ("reader", b"0") in kqfast_log


def io_in_any_order(log: list) -> list:
    """The log with each run of I/O callbacks sorted: asyncio runs one iteration's I/O
    callbacks in the order the kernel listed the fds, which is no contract."""
    out: list = []
    run: list = []
    for entry in log + [None]:
        if entry is not None and entry[0] in ("data", "reader"):
            run.append(entry)
            continue
        out.extend(sorted(run))
        run = []
        if entry is not None:
            out.append(entry)
    return out


@pytest.mark.parametrize("make", LOOPS)
def test_handles_put_straight_into_ready_and_scheduled_run(make):
    """Code that appends to loop._ready or pushes onto loop._scheduled (as asyncio's own
    call_soon_threadsafe and debug-mode call_at do) is honoured, in order."""
    loop = make()
    log = []
    try:
        loop._ready.append(asyncio.Handle(log.append, ("ready",), loop))
        heapq.heappush(loop._scheduled,
                       asyncio.TimerHandle(loop.time(), log.append, ("scheduled",), loop))
        loop.call_soon(log.append, "call_soon")
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert log == ["ready", "call_soon", "scheduled"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=1, max_size=60))
def test_the_timer_heap_is_heapqs_item_for_item(timers):
    """call_later/cancel in any order leave loop._scheduled exactly the list heapq would
    (kqfast compares the timers' _when in C), and they fire in asyncio's order."""
    loop = kqfast.new_event_loop()
    try:
        fired = []
        handles = []
        expected = []
        base = loop.time() + 0.001
        for i, (delay, cancel) in enumerate(timers):
            handle = loop.call_at(base + delay / 1000, fired.append, i)
            heapq.heappush(expected, handle)
            handles.append((handle, cancel))
            assert loop._scheduled == expected and all(
                a is b for a, b in zip(loop._scheduled, expected))
        for handle, cancel in handles:
            if cancel:
                handle.cancel()
        loop.run_until_complete(asyncio.sleep(0.03))
        kept = sorted((h for h, cancel in handles if not cancel), key=lambda h: h.when())
        assert sorted(fired) == sorted(handles.index((h, False)) for h in kept)
        assert [handles[i][0].when() for i in fired] == [h.when() for h in kept]
    finally:
        loop.close()


@pytest.mark.parametrize("make", LOOPS)
def test_a_direct_run_once_runs_one_iteration(make):
    loop = make()
    log = []
    try:
        loop.call_soon(lambda: (log.append(1), loop.call_soon(log.append, 2)))
        loop._run_once()
        assert log == [1]
        loop._run_once()
        assert log == [1, 2]
    finally:
        loop.close()


@pytest.mark.parametrize("make", LOOPS)
def test_stop_ends_the_run_after_the_iteration_and_the_rest_waits(make):
    loop = make()
    log = []
    try:
        loop.call_soon(log.append, "a")
        loop.call_soon(loop.stop)
        loop.call_soon(log.append, "b")
        loop.call_soon(lambda: loop.call_soon(log.append, "next"))
        loop.run_forever()
        assert log == ["a", "b"]
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert log == ["a", "b", "next"]
    finally:
        loop.close()


@pytest.mark.parametrize("make", LOOPS)
def test_keyboard_interrupt_in_a_callback_leaves_the_rest_for_the_next_run(make):
    loop = make()
    log = []

    def interrupt():
        raise KeyboardInterrupt

    try:
        loop.call_soon(log.append, 1)
        loop.call_soon(interrupt)
        loop.call_soon(log.append, 2)
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
        assert log == [1]
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert log == [1, 2]
    finally:
        loop.close()


@pytest.mark.parametrize("make", LOOPS)
def test_threadsafe_calls_wake_a_waiting_loop(make):
    """A loop blocked in its wait (no timer, nothing ready) runs call_soon_threadsafe from a
    thread that started after the loop began waiting."""
    loop = make()
    try:
        async def main():
            done = loop.create_future()
            started = threading.Event()

            def later():
                started.wait()
                loop.call_soon_threadsafe(done.set_result, "woken")

            thread = threading.Thread(target=later)
            thread.start()
            loop.call_soon(started.set)
            result = await done
            thread.join()
            return result

        assert loop.run_until_complete(main()) == "woken"
    finally:
        loop.close()


@pytest.mark.parametrize("make", LOOPS)
def test_debug_mode_names_slow_callbacks(make, caplog):
    loop = make()
    try:
        loop.set_debug(True)
        loop.slow_callback_duration = 0.0
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            loop.call_soon(loop.stop)
            loop.run_forever()
        assert any("Executing" in r.getMessage() and "took" in r.getMessage()
                   for r in caplog.records)
    finally:
        loop.set_debug(False)
        loop.close()
