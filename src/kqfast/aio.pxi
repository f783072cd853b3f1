# What kqfast.Loop (loop.py) takes from C: the selector over a Reactor, through which the
# standard library's loop watches its own fds (add_reader, pipes, the self-pipe), and the
# loop iteration itself.  run_once() is asyncio's BaseEventLoop._run_once, rule for rule
# (as Python 3.10 to 3.15 have it), with the core's I/O pass in the place where asyncio
# runs the I/O callbacks: after the callbacks already ready, before the timers due.
import selectors as _selectors
from asyncio import base_events as _aio_base_events

from libc.math cimport INFINITY, nextafter

cdef object _heappop = _heapq.heappop
cdef object _BaseEventLoop = _aio_base_events.BaseEventLoop
cdef object _format_handle = _aio_base_events._format_handle
cdef int _MIN_SCHEDULED_TIMER_HANDLES = _aio_base_events._MIN_SCHEDULED_TIMER_HANDLES
cdef double _MIN_CANCELLED_TIMER_HANDLES_FRACTION = (
    _aio_base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION)
cdef double _MAXIMUM_SELECT_TIMEOUT = _aio_base_events.MAXIMUM_SELECT_TIMEOUT
cdef int _EVENT_READ = _selectors.EVENT_READ
cdef int _EVENT_WRITE = _selectors.EVENT_WRITE
cdef bint _END_TIME_ULP = "ulp" in _BaseEventLoop._run_once.__code__.co_names


def monotonic():
    """The loop's clock: CLOCK_MONOTONIC, as time.monotonic()."""
    return kq_monotonic()


class KqSelector(_selectors._BaseSelectorImpl):
    """The selectors interface over a Reactor's poller."""

    def __init__(self, Reactor reactor):
        super().__init__()
        self._reactor = reactor

    def register(self, fileobj, events, data=None):
        key = super().register(fileobj, events, data)
        try:
            (<Reactor>self._reactor).watch(key.fd, _poller_mask(events))
        except BaseException:
            super().unregister(fileobj)
            raise
        return key

    def unregister(self, fileobj):
        key = super().unregister(fileobj)
        (<Reactor>self._reactor).unwatch(key.fd)
        return key

    def modify(self, fileobj, events, data=None):
        try:
            key = self._fd_to_key[self._fileobj_lookup(fileobj)]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            (<Reactor>self._reactor).watch(key.fd, _poller_mask(events))
        if events != key.events or data != key.data:
            key = key._replace(events=events, data=data)
            self._fd_to_key[key.fd] = key
        return key

    def select(self, timeout=None):
        return (<Reactor>self._reactor).poll(timeout, self._fd_to_key)


cdef int _poller_mask(int events) except -1:
    if events & ~(_EVENT_READ | _EVENT_WRITE) or not events:
        raise ValueError(f"Invalid events: {events!r}")
    return (KQ_READABLE if events & _EVENT_READ else 0) | (
        KQ_WRITABLE if events & _EVENT_WRITE else 0)


def run_once(self):
    """One iteration of kqfast.Loop: asyncio's _run_once with the core's pass built in."""
    cdef Reactor R = self._reactor
    cdef double timeout = -1, now, end_time
    cdef Py_ssize_t sched_count, ntodo, i
    ready = self._ready
    scheduled = self._scheduled
    sched_count = len(scheduled)
    if (sched_count > _MIN_SCHEDULED_TIMER_HANDLES and self._timer_cancelled_count / sched_count
            > _MIN_CANCELLED_TIMER_HANDLES_FRACTION):
        # Remove delayed calls that were cancelled if their number is too high.
        kept = []
        for handle in scheduled:
            if handle._cancelled:
                handle._scheduled = False
            else:
                kept.append(handle)
        _heapq.heapify(kept)
        self._scheduled = scheduled = kept
        self._timer_cancelled_count = 0
    else:
        while scheduled and scheduled[0]._cancelled:
            self._timer_cancelled_count -= 1
            handle = _heappop(scheduled)
            handle._scheduled = False
    if ready or self._stopping:
        timeout = 0
    elif scheduled:
        timeout = scheduled[0]._when - kq_monotonic()
        if timeout > _MAXIMUM_SELECT_TIMEOUT:
            timeout = _MAXIMUM_SELECT_TIMEOUT
        elif timeout < 0:
            timeout = 0
    event_list = self._selector.select(None if timeout < 0 else timeout)
    if event_list:
        self._process_events(event_list)
    event_list = None
    now = kq_monotonic()
    end_time = now + self._clock_resolution
    if _END_TIME_ULP:
        # Python 3.15: end_time strictly after now even where the resolution is below the
        # clock's float step.
        end_time = now + max(self._clock_resolution, nextafter(now, INFINITY) - now)
    while scheduled:
        handle = scheduled[0]
        if handle._when >= end_time:
            break
        handle = _heappop(scheduled)
        handle._scheduled = False
        ready.append(handle)
    # Only what is ready now runs: what these callbacks schedule waits for the next poll.
    ntodo = len(ready)
    debug = self._debug
    for i in range(ntodo):
        handle = ready.popleft()
        if debug:
            if not handle._cancelled:
                _run_debug(self, handle)
        elif handle is R.io_handle:
            dispatch(R)
        elif HANDLES_IN_C and type(handle) is _Handle:
            if <object>slot_get(handle, H_CANCELLED) is not False:
                continue
            run_handle(handle)
        elif not handle._cancelled:
            handle._run()
    handle = None


def create_future(self):
    """kqfast.Loop.create_future: asyncio's, without a Python frame (asyncio.futures.Future
    looked up each time, as asyncio does: tests swap in the pure-Python one)."""
    return _aio_futures.Future(loop=self)


cdef _run_debug(loop, handle):
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
