"""The private pieces of asyncio kqfast.Loop relies on (kqfast._asyncio_hooks): each matches
the running standard library, or this suite fails naming it; a piece that does not match is
left to the standard library and the loop still serves; and using kqfast as documented warns
about nothing on any Python (asyncio's deprecated policies are not touched)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kqfast import _asyncio_hooks

pytestmark = pytest.mark.timeout(60)

APPS = Path(__file__).resolve().parent / "apps"


def test_every_private_hook_is_what_kqfast_was_written_for():
    """A new Python that changes one shows up here, by name (the loop then runs the
    standard library's version of it: see the fallback tests below)."""
    assert _asyncio_hooks.MISMATCHES == {}, (
        f"asyncio on Python {sys.version.split()[0]} differs from what kqfast.Loop was "
        f"written for in: {_asyncio_hooks.MISMATCHES}")
    assert _asyncio_hooks.FALLBACK_METHODS == set()


# Each fake changes one private piece before kqfast is imported, the way a new Python might.
FAKES = {
    "serving": """
        from asyncio import selector_events
        original = selector_events.BaseSelectorEventLoop._start_serving
        def _start_serving(self, protocol_factory, sock, *rest, new_in_a_later_python=None,
                           **keywords):
            return original(self, protocol_factory, sock, *rest, **keywords)
        selector_events.BaseSelectorEventLoop._start_serving = _start_serving
        """,
    "streams": """
        from asyncio import selector_events
        original = selector_events.BaseSelectorEventLoop._make_socket_transport
        def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None,
                                   server=None, context=None, new_in_a_later_python=None):
            more = {"context": context} if context is not None else {}
            return original(self, sock, protocol, waiter, extra=extra, server=server, **more)
        selector_events.BaseSelectorEventLoop._make_socket_transport = _make_socket_transport
        """,
    "iteration": """
        from asyncio import base_events
        original = base_events.BaseEventLoop._run_once
        def _run_once(self):
            self._iterations_in_a_later_python = 1
            return original(self)
        base_events.BaseEventLoop._run_once = _run_once
        """,
    "handles": """
        import asyncio
        from asyncio import events
        class Handle(events.Handle):
            __slots__ = ("_new_in_a_later_python",)
        events.Handle = asyncio.Handle = Handle
        """,
    "connect": """
        from asyncio import selector_events
        original = selector_events.BaseSelectorEventLoop._sock_connect_cb
        def _sock_connect_cb(self, fut, sock, address, new_in_a_later_python=None):
            return original(self, fut, sock, address)
        selector_events.BaseSelectorEventLoop._sock_connect_cb = _sock_connect_cb
        """,
}

# After the fake: which hooks mismatch, which Loop methods are the standard library's, and
# whether an echo through asyncio.start_server/open_connection still works (on the core's
# streams unless the fake was about them).
PROBE = """
import asyncio, kqfast
from kqfast import _asyncio_hooks
print("mismatches", sorted(_asyncio_hooks.MISMATCHES))
print("fallbacks", sorted(_asyncio_hooks.FALLBACK_METHODS))
for name in sorted(_asyncio_hooks.FALLBACK_METHODS):
    assert name not in vars(kqfast.Loop), name

async def main():
    async def echo(reader, writer):
        writer.write(await reader.read())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    writer.write(b"through the fallback" * 1000)
    writer.write_eof()
    assert await reader.read() == b"through the fallback" * 1000
    print("transport", type(writer.transport).__name__)
    writer.close()
    server.close()
    await server.wait_closed()
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    loop.call_later(0.001, fired.set_result, "timer")
    assert await fired == "timer"

kqfast.run(main())
print("served")
"""


@pytest.mark.parametrize("hook", sorted(FAKES))
def test_a_changed_hook_falls_back_to_the_standard_library(hook):
    code = textwrap.dedent(FAKES[hook]) + PROBE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["mismatches"] == repr([hook])
    assert "served" in proc.stdout
    # Streams stay on the core unless the fake was about making them.
    expected = "_SelectorSocketTransport" if hook == "streams" else "Transport"
    assert lines["transport"] == expected


DOCUMENTED_USES = """
import asyncio, sys, warnings
warnings.simplefilter("error")
import kqfast

async def main():
    return type(asyncio.get_running_loop()).__name__

assert kqfast.run(main()) == "Loop"
if sys.version_info >= (3, 11):
    with asyncio.Runner(loop_factory=kqfast.new_event_loop) as runner:
        assert runner.run(main()) == "Loop"
if sys.version_info >= (3, 12):
    assert asyncio.run(main(), loop_factory=kqfast.new_event_loop) == "Loop"
loop = kqfast.new_event_loop()
assert loop.run_until_complete(main()) == "Loop"
loop.close()
print("quiet")
"""


def test_using_kqfast_as_documented_warns_nothing():
    """Every warning is an error in the child: importing kqfast, kqfast.run, Runner and
    asyncio.run with the loop factory, a loop made by hand."""
    proc = subprocess.run([sys.executable, "-W", "error", "-c", DOCUMENTED_USES],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "quiet", proc.stderr


def test_uvicorn_with_the_loop_factory_warns_nothing_about_loops():
    """uvicorn --loop kqfast:new_event_loop, all warnings shown: none is about event loops or
    their policies (uvicorn's own deprecations are its business)."""
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent("""
            import uvicorn

            class StartThenStop(uvicorn.Server):
                async def startup(self, sockets=None):
                    await super().startup(sockets=sockets)
                    print("loop", type(__import__("asyncio").get_running_loop()).__name__)
                    self.should_exit = True

            config = uvicorn.Config("asgi_hello:app", loop="kqfast:new_event_loop",
                                    port=0, log_level="warning")
            StartThenStop(config).run()
            print("ran")
            """)],
        cwd=APPS, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr
    assert "loop Loop" in proc.stdout
    noisy = [line for line in proc.stderr.splitlines()
             if "Warning" in line and any(word in line.lower() for word in
                                          ("policy", "event loop", "event_loop", "kqfast"))]
    assert noisy == [], proc.stderr
