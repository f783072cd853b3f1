# The Python pass: the records the nogil pass left become protocol callbacks, all under the
# one GIL acquisition of the loop iteration, each in its stream's own context.  A record
# whose stream closed meanwhile (an older generation) is skipped.  KeyboardInterrupt and
# SystemExit propagate out of the loop as in asyncio; the records after them wait for the
# next iteration.

cdef extern from "Python.h":
    # Taking the context as it is: a handle's, which the handle (held) keeps alive.
    int enter_context "PyContext_Enter"(PyObject *context) except -1
    int exit_context "PyContext_Exit"(PyObject *context) except -1


cdef int dispatch(Reactor R) except -1:
    cdef LoopCore *L = &R.core
    cdef Record *r
    cdef Conn *c
    cdef StreamHandle h
    while L.next_record < L.nrecords:
        r = &L.records[L.next_record]
        L.next_record += 1
        c = live(L, r.fd, r.gen)
        if c is NULL:
            continue  # closed by an earlier callback of this batch
        if r.kind == R_MADE:
            made(R, r)
            continue
        if c.transport is NULL:
            continue
        h = <StreamHandle>c.transport  # (held: a callback may drop the table's reference)
        enter_context(<PyObject *>h.context)  # (h's for its whole life)
        try:
            if r.kind == R_DATA:  # the common record first, c at hand
                h.deliver(c, L.arena + r.off, r.length)
            else:
                handle_record(L, r, h)
        finally:
            exit_context(<PyObject *>h.context)
    L.nrecords = L.next_record = 0
    L.arena_used = 0


cdef inline int handle_record(LoopCore *L, Record *r, StreamHandle h) except -1:
    """One record's callbacks (but data's), in its stream's context."""
    if r.kind == R_READABLE:
        h.read_into_buffer()
    elif r.kind == R_EOF:
        h.eof()
    elif r.kind == R_RESUME:
        h.resume_protocol()
    elif r.kind == R_CLOSED:
        h.flushed_after_close()
    elif r.kind == R_LOST:
        h.force_close(_errno_exception(r.err), h.loses_output())
    elif h.tls is None:
        return 0  # a TLS record of a link detached since (its SSLProtocol has the bytes)
    elif r.kind == R_TLS_DATA:
        h.tls.deliver(L.arena + r.off, r.length)
    elif r.kind == R_TLS_INPUT:
        h.tls.step()
    elif r.kind == R_TLS_FAILED:
        h.tls.failed()


cdef bint records_pending(Reactor R) noexcept:
    return R.core.next_record < R.core.nrecords


def dispatch_handle(Reactor R):
    """The Python pass as an asyncio callback (debug mode runs it through its Handle)."""
    dispatch(R)
