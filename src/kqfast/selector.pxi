# The selector kqfast.Loop hands the standard library's loop: the selectors interface over a
# Reactor's poller, through which asyncio watches its own fds (add_reader, pipes, the
# self-pipe).  kqfast's iteration (iteration.pxi) skips select(): it waits on the Reactor
# itself and builds the selector's events only when one of these fds fired.
import selectors as _selectors

cdef int _EVENT_READ = _selectors.EVENT_READ
cdef int _EVENT_WRITE = _selectors.EVENT_WRITE


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
        return (<Reactor>self._reactor).poll(timeout)


cdef int _poller_mask(int events) except -1:
    if events & ~(_EVENT_READ | _EVENT_WRITE) or not events:
        raise ValueError(f"Invalid events: {events!r}")
    return (KQ_READABLE if events & _EVENT_READ else 0) | (
        KQ_WRITABLE if events & _EVENT_WRITE else 0)
