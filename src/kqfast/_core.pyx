# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""kqfast's C core, compiled as one module so the hot path calls across files inline.  In
the order data flows: the poller and plain sockets, the core's structs and its free
functions over one LoopCore (core/), the Loop that runs them, the Python pass, and the
transport handed to protocols."""

include "poller.pxi"
include "core/defs.pxi"
include "core/buffer.pxi"
include "core/conn.pxi"
include "core/timers.pxi"
include "core/output.pxi"
include "core/lines.pxi"
include "core/input.pxi"
include "core/echo.pxi"
include "core/accept.pxi"
include "core/cycle.pxi"
include "loop.pxi"
include "dispatch.pxi"
include "transport.pxi"
