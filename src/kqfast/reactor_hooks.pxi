# What the interpreter calls every Reactor back for: a fork (os.register_at_fork: the
# child's reactors are copies of its parent's) and the garbage collector (the table's
# references to stream handles, traversed and cleared).
import weakref as _weakref


# Every reactor of this process, for the fork hook below.
_reactors = _weakref.WeakSet()


def _after_fork_in_child():
    for reactor in list(_reactors):
        (<Reactor>reactor).forked()


_os.register_at_fork(after_in_child=_after_fork_in_child)


# The table's references to the stream handles, shown to the garbage collector: a loop
# dropped without close() is a cycle through them (reactor -> handle -> reactor, protocol,
# loop) that it must see to free.  Cython writes tp_traverse and tp_clear for the object
# attributes; these wrap them.
cdef extern from "Python.h":
    ctypedef int (*visitproc_t "visitproc")(PyObject *, void *) noexcept
    ctypedef int (*traverseproc_t "traverseproc")(PyObject *, visitproc_t, void *) noexcept
    ctypedef int (*inquiry_t "inquiry")(PyObject *) noexcept
    ctypedef struct GCSlots "PyTypeObject":
        traverseproc_t tp_traverse
        inquiry_t tp_clear

cdef GCSlots *_reactor_type = <GCSlots *><PyObject *>Reactor
cdef traverseproc_t _traverse_attributes = _reactor_type.tp_traverse
cdef inquiry_t _clear_attributes = _reactor_type.tp_clear


cdef int traverse_reactor(PyObject *o, visitproc_t visit, void *arg) noexcept:
    cdef Reactor R = <Reactor>o
    cdef LoopCore *L = &R.core
    cdef int fd, err = _traverse_attributes(o, visit, arg)
    if err or not R.holds_handles:
        return err
    for fd in range(L.top):
        if L.conns[fd].kind == K_STREAM and L.conns[fd].transport is not NULL:
            err = visit(L.conns[fd].transport, arg)
            if err:
                return err
    return 0


cdef int clear_reactor(PyObject *o) noexcept:
    """Breaks the cycle: the table lets go of its handles (their finalizers, which run
    before any clear, have closed their streams)."""
    cdef Reactor R = <Reactor>o
    cdef LoopCore *L = &R.core
    cdef PyObject *h
    cdef int fd
    if R.holds_handles:
        R.holds_handles = False
        for fd in range(L.top):
            if L.conns[fd].kind == K_STREAM and L.conns[fd].transport is not NULL:
                h, L.conns[fd].transport = L.conns[fd].transport, NULL
                Py_XDECREF(h)
    return _clear_attributes(o)


_reactor_type.tp_traverse = traverse_reactor
_reactor_type.tp_clear = clear_reactor
