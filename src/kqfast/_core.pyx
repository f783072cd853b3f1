# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""kqfast's C core: the poller wrapper, the connection loop with its native handlers, and the
Python protocol dispatch.  Each part lives in its own .pxi file, compiled as one module so the
hot path calls across them inline."""

include "poller.pxi"
include "loop.pxi"
include "transport.pxi"
