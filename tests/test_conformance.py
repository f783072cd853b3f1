"""CPython's own event-loop tests, run on kqfast.Loop: test.test_asyncio.test_events'
UnixEventLoopTestsMixin (EventLoopTestsMixin from Python 3.14: streams, servers, sockets, readers and writers, signals, pipes,
datagrams, TLS, timers) and SubprocessTestsMixin, from the running interpreter's standard
library, with create_event_loop() returning kqfast's loop.  None is left out: the standard
loop's own tests of its private internals are in other classes of that module."""
from __future__ import annotations

import asyncio

from test.test_asyncio import test_events
from test.test_asyncio import utils as test_utils

import kqfast


# Python 3.14 merged UnixEventLoopTestsMixin into EventLoopTestsMixin.
LoopTestsMixin = getattr(test_events, "UnixEventLoopTestsMixin", test_events.EventLoopTestsMixin)


class KqfastLoopTests(LoopTestsMixin,
                      test_events.SubprocessTestsMixin,
                      test_utils.TestCase):

    def create_event_loop(self):
        loop = kqfast.new_event_loop()
        assert isinstance(loop, asyncio.AbstractEventLoop)
        return loop

    def tearDown(self):
        # Whatever ran, ran on kqfast's loop.
        assert isinstance(self.loop, kqfast.Loop)
        super().tearDown()
