# The Reactor: one LoopCore as a Python object.  kqfast.Server's native loops run it on its
# own (run(): the nogil cycle until stop); a kqfast.Loop runs it once per asyncio iteration
# (poll(), then the Python pass in dispatch.pxi).  Everything here is set-up, lifecycle and
# thread-safe requests; the per-event work is in core/.
import asyncio as _asyncio
import logging as _logging
import threading as _threading
from collections import deque as _deque

cimport cython
from cpython.pythread cimport PyThread_get_thread_ident

cdef extern from "Python.h":
    ctypedef struct PyInterpreterState:
        pass
    PyInterpreterState *PyInterpreterState_Head()
    PyInterpreterState *PyInterpreterState_Next(PyInterpreterState *interp)
    void *PyInterpreterState_ThreadHead(PyInterpreterState *interp)
    void *PyThreadState_Next(void *tstate)
    # The running thread's state: which thread runs a loop (a pointer compare), and its
    # current context (NULL before any was made: a stream's callbacks enter the stream's
    # own context unless it is already the current one, as entering it twice raises).
    ctypedef struct ThreadContext "PyThreadState":
        PyObject *context
    ThreadContext *current_thread_state "PyThreadState_Get"() noexcept

_log = _logging.getLogger("kqfast")

cdef class StreamHandle


cdef enum:
    GIL_HOLD_MS = 5     # CPython's default switch interval


cdef inline bint only_thread() noexcept:
    """Whether this is the process's one interpreter with one thread state: no other thread
    can be waiting for the GIL."""
    cdef PyInterpreterState *interp = PyInterpreterState_Head()
    return (PyInterpreterState_Next(interp) is NULL and
            PyThreadState_Next(PyInterpreterState_ThreadHead(interp)) is NULL)


# final: the core is reached through self.core directly (no vtable), so the C compiler can
# inline the hot path's small steps.
@cython.final
cdef class Reactor:
    """A poller and the fd table of everything it watches."""
    cdef LoopCore core
    cdef bint configured
    # The table owns a reference to each stream's handle while the loop is open (shown to
    # the garbage collector: see traverse_reactor); at the loop's close they become
    # borrowed, and each handle lives as long as its transport is referenced.
    cdef bint holds_handles
    cdef object __weakref__
    cdef dict sources               # fd -> Source: listeners and inboxes
    cdef object tls_context         # a native TLS server's ssl.SSLContext
    cdef object inbox_w             # the write end of this reactor's inbox, if any
    cdef object calls               # call_soon_threadsafe() of a native server
    cdef object pending_exc
    # The asyncio loop this reactor serves, the thread that runs it (0: not running), and
    # the handle its iteration runs the Python pass for.
    cdef object loop
    cdef unsigned long thread_id
    cdef void *thread_state         # the PyThreadState of that thread
    cdef readonly object io_handle
    cdef object on_drained
    # The asyncio loop's own state, kept here where the iteration and call_soon() read it
    # without a dictionary lookup (kqfast.Loop's _ready, _scheduled, _stopping and
    # _timer_cancelled_count are properties over these; _debug and the closed state are
    # mirrored): the ready deque with its bound append and popleft, the timer heap, ...
    cdef object ready, ready_append, ready_popleft
    cdef public list scheduled
    cdef public bint stopping, closed, debug
    cdef public Py_ssize_t timer_cancelled_count
    cdef double clock_resolution
    # ... whether asyncio's run_forever is running the loop (its _run_once then runs every
    # iteration), and the selector's fd -> key map.
    cdef public bint in_run_forever
    cdef dict selector_keys

    def __cinit__(self):
        cdef LoopCore *L = &self.core
        L.reserve_fd = -1
        L.poller = kq_poller_create()
        if L.poller is NULL:
            PyErr_SetFromErrno(OSError)
        L.conns = table_reserve()
        L.records = <Record *>malloc(RECORD_CAP * sizeof(Record))
        L.arena = <char *>malloc(ARENA_SIZE)
        L.tls_out = <char *>malloc(TLS_OUT_CHUNK)
        if L.conns is NULL or L.records is NULL or L.arena is NULL or L.tls_out is NULL or not table_grow(
                L, fd_limit()):
            raise MemoryError()
        timers_init(L)
        L.handler = H_PROTOCOL
        L.max_line = L.high_water = 65536
        L.low_water = 16384
        L.max_output = L.max_connections = <int>0x7FFFFFFF
        self.sources = {}
        self.calls = _deque()
        self.holds_handles = True
        _reactors.add(self)  # for the fork hook (reactor_hooks.pxi)

    def __dealloc__(self):
        cdef LoopCore *L = &self.core
        cdef PyObject *h
        cdef int fd
        if L.reserve_fd >= 0:
            c_close(L.reserve_fd)
        # Streams still open have no one left to close them (detached ones, or those whose
        # handles are being collected with this reactor): closed now, the poller next.
        for fd in range(L.top if L.conns is not NULL else 0):
            if L.conns[fd].kind == K_STREAM:
                h, L.conns[fd].transport = L.conns[fd].transport, NULL
                c_close(fd)
                if L.conns[fd].tls is not NULL:
                    tls_forget(&L.conns[fd])
                if self.holds_handles:
                    Py_XDECREF(h)
        kq_poller_free(L.poller)
        table_release(L)
        free(L.records)
        free(L.arena)
        free(L.tls_out)
        free(L.handoff_fds)

    def configure(self, handler, *, max_line, high_water, low_water, max_output, idle_timeout,
                  linger_timeout, max_connections, ssl=None):
        """Sets what serves the streams of served sources and the limits they live by (and
        for native handlers, the ssl.SSLContext their streams are accepted with)."""
        cdef LoopCore *L = &self.core
        if ssl is not None and handler in (ECHO, LINE_ECHO):
            L.tls_ctx = context_ctx(ssl)
            self.tls_context = ssl  # keeps L.tls_ctx alive
        if handler is ECHO:
            L.handler = H_ECHO
        elif handler is LINE_ECHO:
            L.handler = H_LINE_ECHO
        else:
            L.handler = H_PROTOCOL
        L.max_line, L.high_water, L.low_water = max_line, high_water, low_water
        L.max_output = max_output
        timers_configure(L, idle_timeout, linger_timeout)
        L.max_connections = max_connections
        L.reserve_fd = kq_open_reserve()
        self.configured = True

    def add_listener(self, sock, Source source):
        """Accepts from sock in C from now on; its streams are source's."""
        cdef int fd = sock.fileno()
        cdef uint32_t flags = (C_SERVED if source.served else 0) | (
            C_UNIX if sock.family == AF_UNIX else 0)
        self.check_free(fd)
        if open_entry(&self.core, fd, K_LISTENER, flags, KQ_READABLE, <PyObject *>source) < 0:
            PyErr_SetFromErrno(OSError)
        self.sources[fd] = source

    def remove_listener(self, int fd):
        """Stops accepting from fd, if it is a listener of this reactor (its socket stays
        open: its owner closes it).  Clients it accepted in this batch are turned away: its
        asyncio Server is closing, and asyncio makes no transport for a closed server."""
        if self.sources.pop(fd, None) is not None:
            close_entry(&self.core, fd)

    def open_inbox(self, Source source):
        """Makes this reactor a hand-off target: streams arrive as fds on a pipe."""
        r, w = _os.pipe()  # close-on-exec, as every fd Python makes
        _os.set_blocking(r, False)
        _os.set_blocking(w, False)
        if open_entry(&self.core, r, K_INBOX, C_SERVED if source.served else 0, KQ_READABLE,
                      <PyObject *>source) < 0:
            PyErr_SetFromErrno(OSError)
        self.sources[r] = source
        self.inbox_w = w

    def hand_off_to(self, list reactors):
        """This (accepting) reactor spreads its new streams over reactors, round-robin."""
        cdef Reactor other
        self.core.handoff_fds = <int *>malloc(len(reactors) * sizeof(int))
        if self.core.handoff_fds is NULL:
            raise MemoryError()
        for i, other in enumerate(reactors):
            self.core.handoff_fds[i] = -1 if other is self else other.inbox_w
        self.core.nhandoff = len(reactors)

    # ---- fork ------------------------------------------------------------------------------

    cdef forked(self):
        """In a forked child (os.register_at_fork): every fd of this reactor is a copy of one
        its parent serves, and its epoll instance is the parent's (a kqueue is not even
        inherited).  The poller lets go of it, closes stop short of resets, and running or
        using a stream raises (check_process)."""
        self.core.inherited = 1
        kq_poller_disown(self.core.poller)

    @property
    def inherited(self):
        """True in a forked child: the loop is a copy of its parent's."""
        return bool(self.core.inherited)

    cdef int check_process(self) except -1:
        if self.core.inherited:
            raise RuntimeError("this kqfast loop was created in another process (before a "
                               "fork): a forked child must create its own loop")
        return 0

    cdef check_free(self, int fd):
        self.check_process()
        if not fits_table(&self.core, fd):
            raise ValueError(f"fd {fd} is outside this loop's table (the fd limit)")
        # A watched fd gives way: the selector's entry may be one whose fd Python closed.
        if self.core.conns[fd].kind not in (K_FREE, K_WATCHED):
            raise RuntimeError(f"fd {fd} is already in use by this loop")

    # ---- an asyncio loop's reactor ----------------------------------------------------

    def attach(self, loop, dict selector_keys):
        """Serves the asyncio loop loop, whose selector keeps selector_keys: its streams'
        callbacks go through it."""
        self.loop = loop
        self.debug = loop.get_debug()
        self.clock_resolution = loop._clock_resolution
        self.selector_keys = selector_keys
        self.io_handle = _asyncio.Handle(dispatch_handle, (self,), loop)

    @property
    def ready_queue(self):
        return self.ready

    @ready_queue.setter
    def ready_queue(self, queue):
        self.ready, self.ready_append, self.ready_popleft = queue, queue.append, queue.popleft

    @property
    def thread_id(self):
        return self.thread_id

    @thread_id.setter
    def thread_id(self, ident):
        """Set by asyncio in the thread that starts running the loop (None when it stops)."""
        self.thread_id = ident or 0
        self.thread_state = <void *>current_thread_state() if ident else NULL

    def watch(self, int fd, int mask):
        """The selector's registration of fd: interest in mask (KQ_READABLE|KQ_WRITABLE)."""
        cdef Conn *c
        self.check_process()
        if not fits_table(&self.core, fd):
            raise ValueError(f"fd {fd} is outside this loop's table (the fd limit)")
        c = &self.core.conns[fd]
        if c.kind == K_WATCHED:
            if set_mask(&self.core, fd, mask) < 0:
                PyErr_SetFromErrno(OSError)
        elif c.kind == K_FREE:
            if open_entry(&self.core, fd, K_WATCHED, 0, mask, NULL) < 0:
                PyErr_SetFromErrno(OSError)
        else:
            raise RuntimeError(f"fd {fd} is used by a kqfast transport or server")

    def unwatch(self, int fd):
        if 0 <= fd < self.core.nconns and self.core.conns[fd].kind == K_WATCHED:
            close_entry(&self.core, fd)

    def poll(self, timeout):
        """The selector's select() (what asyncio's own _run_once calls, where kqfast's is not
        used): one nogil pass, the Python pass's handle in the ready queue if it has work;
        returns the selector's ready keys as [(key, events)]."""
        self.wait(timeout_ms(timeout))
        if records_pending(self):
            self.ready_append(self.io_handle)
        return self.watched_keys()

    cdef int wait(self, int ms) except -1:
        """One pass of the core: waits up to ms milliseconds (-1: until something happens; 0
        while records wait for the Python pass), serves the streams in C and leaves records
        for dispatch().  Ctrl-C during the wait raises here.  Returns 1 when Python code ran
        (signal handlers, the drained callback), else 0.

        The GIL is released for the wait, but for its first GIL_HOLD_MS where no other
        thread could want it (one interpreter, one thread state): handing it over and taking
        it back costs a busy loop more than its callbacks (~400 instructions a wake), and
        nobody is there to take it.  A thread that appears meanwhile (a C library's, asking
        for the GIL) waits at most that long, as for any Python code's switch interval."""
        cdef LoopCore *L = &self.core
        cdef int n
        self.check_process()
        if records_pending(self):
            ms = 0
        if L.nrecords > RECORD_SOFT_CAP:
            # The last Python pass was cut short (a KeyboardInterrupt, the rest of its batch
            # left for this iteration) with more records pending than one batch's reserve
            # leaves room for: no event is taken until they are dispatched, and readiness,
            # level-triggered, waits in the kernel.  (A native server never has records.)
            set_clock(L)
            n = 0
        elif ms == 0 or not only_thread():
            with nogil:
                n = poll_once(L, ms)
        else:
            n = poll_once(L, ms if 0 < ms < GIL_HOLD_MS else GIL_HOLD_MS)
            if n == 0 and (ms < 0 or ms > GIL_HOLD_MS) and not records_pending(self):
                with nogil:  # nothing came: wait on without the GIL
                    n = poll_once(L, -1 if ms < 0 else ms - GIL_HOLD_MS)
        if n < 0:
            if errno != EINTR:
                L.wait_errno = errno
                L.wait_failures += 1
                self.report_wait_error()
            PyErr_CheckSignals()
            return 1
        L.wait_failures = 0
        if self.on_drained is not None and L.n_current == 0:
            callback, self.on_drained = self.on_drained, None
            callback()
            return 1
        return 0

    cdef list watched_keys(self):
        """The selector's fds that were ready in the last pass, as [(key, events)]."""
        cdef LoopCore *L = &self.core
        cdef int i, mask, events
        if L.nwatched == 0:
            return []
        ready = []
        for i in range(L.nwatched):
            key = self.selector_keys.get(L.watched[i].fd)
            if key is None:
                continue
            mask = L.watched[i].mask
            events = (_EVENT_READ if mask & KQ_READABLE else 0) | (
                _EVENT_WRITE if mask & KQ_WRITABLE else 0)
            if events & key.events:
                ready.append((key, events & key.events))
        L.nwatched = 0
        return ready

    def take_error(self, int fd):
        """The socket error the poller reported with a watched fd's last hang-up (0: none),
        cleared.  libkqueue fetches it with SO_ERROR to fill EV_EOF's fflags, which clears it
        on the socket: a failed connect() would look like a success without this."""
        cdef int err = 0
        if 0 <= fd < self.core.nconns and self.core.conns[fd].kind == K_WATCHED:
            err, self.core.conns[fd].error = self.core.conns[fd].error, 0
        return err

    def transport_of(self, int fd):
        """The Transport of the stream at fd, or None."""
        cdef Conn *c
        if fd < 0 or fd >= self.core.nconns:
            return None
        c = &self.core.conns[fd]
        if c.kind != K_STREAM or c.transport is NULL:
            return None
        return (<StreamHandle>c.transport).transport

    def when_drained(self, callback):
        """Calls callback() once no stream is left (now, if none is)."""
        self.on_drained = callback
        kq_poller_wake(self.core.poller)

    def close_streams(self):
        """Closes every stream (a stopping server's): what was read is delivered first, then
        each closes at once when it owes its peer nothing, otherwise flushes and closes
        gracefully."""
        cdef LoopCore *L = &self.core
        cdef int fd
        cdef StreamHandle h
        dispatch(self)
        for fd in range(L.top):
            if L.conns[fd].kind == K_STREAM and L.conns[fd].transport is not NULL:
                h = <StreamHandle>L.conns[fd].transport
                if owes_nothing(L, fd) and not h.closing:
                    h.force_close(None, False)  # connection_lost(None): a clean close
                else:
                    h.close()

    def abort_streams(self, exc):
        """Ends every stream: a server's last resort (its stop's deadline has passed, or its
        loop stopped).  Those with a protocol are reset, which gets connection_lost(exc), an
        error that says so; lingering ones (see end_all) close with a FIN."""
        cdef LoopCore *L = &self.core
        cdef int fd
        for fd in range(L.top):
            if L.conns[fd].kind == K_STREAM and L.conns[fd].transport is not NULL:
                (<StreamHandle>L.conns[fd].transport).force_close(exc, True)
        end_all(L)

    def release_streams(self):
        """The loop closes, and leaves its streams to their transports as asyncio's loop
        does: each transport closes its stream (with a FIN, and a ResourceWarning) when it is
        collected, unless it is closed first.  Streams no transport has (accepted, not made
        yet) close now.  In a forked child every stream is a copy of one the parent serves:
        each copy is closed now, and nothing of the parent's is touched."""
        cdef LoopCore *L = &self.core
        cdef PyObject *h
        cdef int fd
        for fd in range(L.top):
            if L.conns[fd].kind != K_STREAM:
                continue
            h = L.conns[fd].transport
            if h is NULL:
                close_now(L, fd, False)
            elif L.inherited:
                (<StreamHandle>h).closing = True
                (<StreamHandle>h).end(False, False)
        # The table's references become borrowed: each handle now lives as long as its
        # transport is referenced (its end() clears the table's pointer).
        self.holds_handles = False
        for fd in range(L.top):
            if L.conns[fd].kind == K_STREAM and L.conns[fd].transport is not NULL:
                Py_XDECREF(L.conns[fd].transport)

    def stop_serving(self):
        """Closes the listeners and inboxes a kqfast.Server gave this reactor; False when
        there were none (left)."""
        if not self.sources:
            return False
        self.release_sources()
        return True

    # ---- a native server's loop ---------------------------------------------------------

    def run(self):
        """Serves until stop(); re-raises KeyboardInterrupt/SystemExit from thread-safe calls
        or signals after closing everything."""
        self.check_process()
        if not self.configured or self.core.finished:
            raise RuntimeError("the loop is not configured or has already run")
        old_wakeup = self.watch_signals()
        set_clock(&self.core)
        try:
            while not self.core.finished:
                with nogil:
                    run_native(&self.core)
                self.check_signals()
                self.run_calls()
                if self.core.wait_errno:
                    self.report_wait_error()
                if self.pending_exc is not None:
                    break
        finally:
            self.teardown(old_wakeup)
        if self.pending_exc is not None:
            exc, self.pending_exc = self.pending_exc, None
            raise exc

    cdef check_signals(self):
        if self.core.signal_pending:
            self.core.signal_pending = 0
            try:
                PyErr_CheckSignals()
            except BaseException as exc:
                self.pending_exc = exc

    cdef run_calls(self):
        """Runs what call_soon_threadsafe() scheduled."""
        kq_store(&self.core.calls_pending, 0)
        for _ in range(len(self.calls)):
            callback, args = self.calls.popleft()
            try:
                callback(*args)
            except (KeyboardInterrupt, SystemExit) as exc:
                if self.pending_exc is None:
                    self.pending_exc = exc
            except BaseException:
                _log.exception("kqfast: a call_soon_threadsafe() callback failed")
        if self.calls:
            kq_store(&self.core.calls_pending, 1)

    cdef report_wait_error(self):
        """A failed wait is logged and retried: kernels report errnos their manuals do not
        list (Darwin's ETIMEDOUT).  Only a wait that keeps failing stops the loop."""
        err, self.core.wait_errno = self.core.wait_errno, 0
        if self.core.wait_failures >= 100:
            raise OSError(err, f"the poller keeps failing: {_os.strerror(err)}")
        _log.warning("kqfast: poller wait failed (%s); retrying", _os.strerror(err))

    cdef object watch_signals(self):
        """In the main thread, Python's signal wakeup fd joins the poll set, so Ctrl-C wakes
        the nogil wait even when it arrives just before it (no EINTR then)."""
        import signal
        if _threading.current_thread() is not _threading.main_thread():
            return None
        import socket
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        old = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        open_entry(&self.core, rsock.fileno(), K_SIGNAL, 0, KQ_READABLE, NULL)
        return (old, rsock, wsock)

    cdef teardown(self, old_wakeup):
        cdef LoopCore *L = &self.core
        L.stopping = 1
        self.release_sources()
        end_all(L)
        if not L.inherited:
            self.run_calls()  # (a forked child's copies are its parent's requests)
        if L.reserve_fd >= 0:
            c_close(L.reserve_fd)
            L.reserve_fd = -1
        if old_wakeup is not None:
            import signal
            old, rsock, wsock = old_wakeup
            signal.set_wakeup_fd(old)
            close_entry(L, rsock.fileno())
            rsock.close()
            wsock.close()
        L.finished = 1

    cdef release_sources(self):
        """Stops accepting; fds handed over but not yet admitted are reset."""
        cdef int fd
        close_sources(&self.core)
        for ifd, source in self.sources.items():
            if source.sock is None:  # an inbox
                # (In a forked child the numbers in it name the parent's fds.)
                while not self.core.inherited and (fd := kq_read_fd(ifd)) >= 0:
                    kq_abort_fd(fd)
                _os.close(ifd)
            elif source.served:
                source.sock.close()
        self.sources.clear()
        if self.inbox_w is not None:
            _os.close(self.inbox_w)
            self.inbox_w = None

    def close(self):
        """Releases the listeners and fds of a native loop that will not run (again)."""
        cdef LoopCore *L = &self.core
        if L.finished:
            return
        self.teardown(None)  # in a forked child too: it closes the child's copies only

    def request_stop(self, double timeout):
        """Thread-safe: stop accepting, let output flush for up to timeout seconds, close."""
        if not kq_load(&self.core.stop_requested):
            self.core.stop_deadline = kq_monotonic() + timeout
            kq_store(&self.core.stop_requested, 1)
        kq_poller_wake(self.core.poller)

    def call_soon_threadsafe(self, callback, *args):
        """Runs callback(*args) on a native loop's thread, soon."""
        self.calls.append((callback, args))
        kq_store(&self.core.calls_pending, 1)
        kq_poller_wake(self.core.poller)

    def wake(self):
        """Thread-safe: ends the current wait."""
        kq_poller_wake(self.core.poller)

    def stats(self):
        cdef LoopCore *L = &self.core
        return {
            "connections_current": L.n_current,
            "connections_total": L.n_total,
            "connections_rejected": L.n_rejected,
            "timeouts": L.n_timeouts,
            "errors": L.n_errors,
            "bytes_in": L.bytes_in,
            "bytes_out": L.bytes_out,
        }

    @property
    def listen_fileno(self):
        """The first listener's fd (-1: none)."""
        for fd, source in self.sources.items():
            if source.sock is not None:
                return fd
        return -1

    def _feed_events(self, list events):
        """Test hook: handles [(fd, mask, err)] as if the poller had returned them, then
        runs the Python pass and the callbacks it scheduled.  Lets the fuzz tests send what a
        kernel rarely does."""
        cdef kq_event ev
        set_clock(&self.core)
        if self.core.nrecords > RECORD_SOFT_CAP:
            events = []  # as poll(): the pending records' room is not there
        for i in range(min(len(events), EVENT_CAP)):
            ev.fd, ev.mask, ev.err = events[i]
            handle_event(&self.core, ev)
        end_batch(&self.core)
        self.core.nwatched = 0
        if self.loop is None:
            return  # a native server's: nothing for Python
        dispatch(self)
        ready = self.loop._ready
        while ready:
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()
