# kqfast.Loop's iteration: asyncio's BaseEventLoop._run_once, rule for rule (as Python 3.10
# to 3.15 have it), in C over the loop state the Reactor keeps, with the core's I/O pass
# where asyncio runs the I/O callbacks: after the callbacks already ready, before the timers
# due.  Called by asyncio's run_forever, run_once() runs every iteration until the loop stops,
# so an iteration costs no Python frame, no attribute lookup on the loop and no select():
# the wait is the Reactor's own, and the selector's bookkeeping is touched only when one of
# its fds (add_reader, the self-pipe, pipes) fired.
import sys as _sys
from asyncio import base_events as _aio_base_events

from libc.math cimport INFINITY, nextafter

cdef object _BaseEventLoop = _aio_base_events.BaseEventLoop
cdef object _format_handle = _aio_base_events._format_handle
cdef int _MIN_SCHEDULED_TIMER_HANDLES = _aio_base_events._MIN_SCHEDULED_TIMER_HANDLES
cdef double _MIN_CANCELLED_TIMER_HANDLES_FRACTION = (
    _aio_base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION)
cdef double _MAXIMUM_SELECT_TIMEOUT = _aio_base_events.MAXIMUM_SELECT_TIMEOUT
# asyncio before 3.13 waits min(max(0, when - now), maximum): a NaN deadline waits 0 and its
# callback runs; 3.13 keeps the NaN, and the selector raises ValueError.
cdef bint _NAN_DEADLINE_WAITS_0 = _sys.version_info < (3, 13)
# Python 3.15: end_time = now + max(resolution, math.ulp(now)), strictly after now.
cdef bint _END_TIME_ULP = "ulp" in _BaseEventLoop._run_once.__code__.co_names


def run_once(self):
    """kqfast.Loop._run_once.  From asyncio's run_forever (whose own loop then sees _stopping
    and ends), every iteration until the loop stops; called on its own, one."""
    cdef Reactor R = self._reactor
    if not R.in_run_forever:
        iteration(R)
        return
    while True:
        iteration(R)
        if R.stopping:
            return


cdef int iteration(Reactor R) except -1:
    cdef LoopCore *L = &R.core
    cdef object ready = R.ready
    cdef list scheduled = R.scheduled
    cdef Py_ssize_t early = len(ready), due = 0, i
    cdef double timeout, end_time
    cdef int ms = -1
    cdef bint python_ran
    if (len(scheduled) > _MIN_SCHEDULED_TIMER_HANDLES and <double>R.timer_cancelled_count
            / len(scheduled) > _MIN_CANCELLED_TIMER_HANDLES_FRACTION):
        drop_cancelled_timers(R)
        scheduled = R.scheduled
    else:
        while scheduled and timer_cancelled(scheduled[0]):
            R.timer_cancelled_count -= 1
            unschedule(heap_pop(scheduled))
    if R.stopping or early:
        ms = 0
    elif scheduled:
        timeout = timer_when(scheduled[0]) - kq_monotonic()
        if timeout != timeout and not _NAN_DEADLINE_WAITS_0:
            raise ValueError("Invalid value NaN (not a number)")  # as select.epoll's poll()
        timeout = min(timeout, _MAXIMUM_SELECT_TIMEOUT)
        ms = 0 if not timeout > 0 else <int>(timeout * 1000.0 + 0.999)  # never shorter
    python_ran = R.wait(ms)
    if L.nwatched:
        R.loop._process_events(R.watched_keys())
        python_ran = True
    # What is ready now runs; what these callbacks schedule waits for the next poll.  The
    # callbacks ready before the pass's records (early: what was ready before the wait,
    # unless Python code ran since), the records, the timers due.
    if python_ran:
        early = len(ready)
    if scheduled:
        end_time = L.now + R.clock_resolution  # L.now: the clock, read as the wait ended
        if _END_TIME_ULP:
            end_time = L.now + max(R.clock_resolution, nextafter(L.now, INFINITY) - L.now)
        while scheduled:
            handle = scheduled[0]
            if timer_when(handle) >= end_time:
                break
            unschedule(heap_pop(scheduled))
            R.ready_append(handle)
            due += 1
        handle = None
    for i in range(early):
        run_ready(R, R.ready_popleft())
    if records_pending(R):
        if R.debug:
            run_debug(R.loop, R.io_handle)
        else:
            dispatch(R)
    for i in range(due):
        run_ready(R, R.ready_popleft())
    return 0


cdef inline int run_ready(Reactor R, handle) except -1:
    """A handle of the ready queue, as _run_once runs it."""
    cdef object kind = type(handle)
    if R.debug:
        if not handle._cancelled:
            run_debug(R.loop, handle)
    elif HANDLES_IN_C and (kind is _Handle or kind is _TimerHandle):
        if <object>slot_get(handle, H_CANCELLED) is False:
            run_handle(handle)
    elif not handle._cancelled:
        handle._run()  # a Handle subclass of its own (3.14's _ThreadSafeHandle locks)
    return 0


cdef run_debug(loop, handle):
    """Debug mode: slow callbacks are named in a warning, as asyncio does."""
    loop._current_handle = handle
    t0 = kq_monotonic()
    try:
        handle._run()
    finally:
        loop._current_handle = None
    dt = kq_monotonic() - t0
    if dt >= loop.slow_callback_duration:
        _aio_log.warning("Executing %s took %.3f seconds", _format_handle(handle), dt)
