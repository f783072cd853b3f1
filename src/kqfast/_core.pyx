# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
# cython: freethreading_compatible=True
# (On free-threaded CPython the GIL stays off: a Reactor and its streams belong to one thread,
# whose transports refuse any other; what other threads may call, stop() and wake() and
# call_soon_threadsafe(), goes through atomics and a deque.  Declared, not yet verified: no
# free-threaded interpreter runs the suite here; the Actions matrix has 3.14t.)
"""kqfast's C core, compiled as one module so the hot path calls across files inline.  In
the order data flows: the poller and plain sockets, the core's structs and its free
functions over one LoopCore (core/), the Reactor that runs them, the stream handles and the
transports protocols see, the Python pass, and what kqfast.Loop takes from C."""

include "poller.pxi"
include "core/defs.pxi"
include "core/buffer.pxi"
include "core/conn.pxi"
include "core/timers.pxi"
include "core/output.pxi"
include "core/lines.pxi"
include "core/input.pxi"
include "core/echo.pxi"
include "core/tls.pxi"
include "core/accept.pxi"
include "core/cycle.pxi"
include "sources.pxi"
include "reactor.pxi"
include "reactor_hooks.pxi"
include "callbacks.pxi"
include "rare_state.pxi"
include "handle.pxi"
include "transport.pxi"
include "tls_link.pxi"
include "tls_protocol.pxi"
include "dispatch.pxi"
include "handles.pxi"
include "timer_heap.pxi"
include "selector.pxi"
include "iteration.pxi"
