# The poller and plain non-blocking sockets, as Python objects: the tutorial-level API
# (kqfast.Socket, and the listening socket under kqfast.listen) and what the tests use to check
# the backend directly.
import os as _os

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport errno
from posix.unistd cimport close as c_close

from kqfast.sys cimport *

BACKEND = kq_poller_backend.decode()
READABLE = KQ_READABLE
WRITABLE = KQ_WRITABLE
HANGUP = KQ_HANGUP
ERROR = KQ_ERROR

cdef enum:
    POLLER_BATCH = 256


cdef int timeout_ms(object timeout) except? -2:
    """Seconds (None: forever) to the poller's milliseconds, rounded up so a wait is never
    shorter than asked."""
    if timeout is None or timeout < 0:
        return -1
    return <int>min(timeout * 1000.0 + 0.999, 86400000.0)


cdef class Poller:
    """The kernel poller behind the loop: set(fd, old_mask, new_mask), wait(), wake()."""
    cdef kq_poller *poller
    cdef kq_event events[POLLER_BATCH]

    def __cinit__(self):
        self.poller = kq_poller_create()
        if self.poller is NULL:
            PyErr_SetFromErrno(OSError)

    def __dealloc__(self):
        kq_poller_free(self.poller)

    cdef int _check_open(self) except -1:
        if self.poller is NULL:
            raise ValueError("the poller is closed")
        return 0

    def set(self, int fd, int old_mask, int new_mask):
        """Moves fd's interest from old_mask to new_mask (READABLE|WRITABLE; 0 removes it)."""
        self._check_open()
        if kq_poller_set(self.poller, fd, old_mask, new_mask) < 0:
            PyErr_SetFromErrno(OSError)

    def wait(self, timeout=None):
        """Waits with the GIL released; returns [(fd, mask, errno)].  A signal that arrives
        during the wait raises here if its Python handler raises (Ctrl-C)."""
        self._check_open()
        cdef int ms = timeout_ms(timeout), n
        with nogil:
            n = kq_poller_wait(self.poller, self.events, POLLER_BATCH, ms)
        if n < 0:
            if errno != EINTR:
                PyErr_SetFromErrno(OSError)
            PyErr_CheckSignals()
            return []
        return [(self.events[i].fd, self.events[i].mask, self.events[i].err) for i in range(n)]

    def wake(self):
        """Makes a wait in another thread return; safe from any thread."""
        self._check_open()
        if kq_poller_wake(self.poller) < 0:
            PyErr_SetFromErrno(OSError)

    def close(self):
        kq_poller_free(self.poller)
        self.poller = NULL


cdef object _listen_error(str host, int port):
    cdef int err = errno
    where = host if "/" in host else (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return OSError(err, f"cannot listen on {where}: {_os.strerror(err)}")



def _listen_fd(str host, int port, int backlog, bint reuse_port):
    """Opens a non-blocking listening socket; returns (fd, family)."""
    cdef int family = 0, fd
    cdef bytes chost = host.encode()
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, not {port}")
    fd = kq_listen(chost, port, backlog, reuse_port, &family)
    if fd < 0:
        raise _listen_error(host, port)
    return fd, family


cdef class Socket:
    """A non-blocking socket by its fd, as in the tutorial: read, write, close, str(sock)."""
    cdef readonly int fd
    cdef public object _owner  # the EventLoop that watches this fd, told when it is closed
    cdef public bint at_eof

    def __cinit__(self, int fd):
        self.fd = fd
        self.at_eof = False

    def fileno(self):
        return self.fd

    def read(self, n=65536):
        """Returns what is there (up to n bytes), b"" at EOF; BlockingIOError if nothing is."""
        cdef ssize_t got
        cdef Py_ssize_t size
        cdef char *dst
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise (ValueError if isinstance(n, int) else TypeError)(
                f"n must be an int >= 0, not {n!r}")
        size = n
        if self.fd < 0:
            raise OSError(9, "read on a closed Socket")
        out = PyBytes_FromStringAndSize(NULL, size)
        dst = PyBytes_AS_STRING(out)
        with nogil:
            got = recv(self.fd, dst, size, 0)
        if got < 0:
            PyErr_SetFromErrno(OSError)
        if got == 0:
            self.at_eof = True
        return out[:got]

    def write(self, data):
        """Sends what the socket takes now and returns the count (never raises SIGPIPE)."""
        cdef Py_buffer view
        cdef ssize_t sent
        if self.fd < 0:
            raise OSError(9, "write on a closed Socket")
        if not PyObject_CheckBuffer(data):
            raise TypeError(f"data must be a bytes-like object, not {data!r}")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                sent = kq_send(self.fd, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        if sent < 0:
            PyErr_SetFromErrno(OSError)
        return sent

    def accept(self):
        """Accepts one client as a non-blocking Socket, or returns None if none is waiting."""
        cdef int fd
        with nogil:
            fd = kq_accept(self.fd)
        if fd < 0:
            if kq_retry_later(errno) or errno == ECONNABORTED:
                return None
            PyErr_SetFromErrno(OSError)
        kq_prepare_accepted(fd, 1)
        return Socket(fd)

    def getsockname(self):
        import socket
        s = socket.socket(fileno=self.fd)
        try:
            return s.getsockname()
        finally:
            s.detach()

    def close(self):
        if self.fd < 0:
            return
        if self._owner is not None:
            self._owner._forget(self)
            self._owner = None
        c_close(self.fd)
        self.fd = -1

    def __str__(self):
        return str(self.fd)

    def __repr__(self):
        return f"<kqfast.Socket fd={self.fd}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
