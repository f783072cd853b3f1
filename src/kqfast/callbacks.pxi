# How the Python pass calls protocol code, cheaply, for the three kinds of protocol it
# feeds: a plain one's data_received, an asyncio.BufferedProtocol's buffers (asyncio's own
# feeding, for bytes already read), and a LineProtocol's lines, which the core frames.  Each
# protocol method is looked up once per stream (its class's function, as uvloop does),
# data_received goes through that function's vectorcall slot with its bytes made right there,
# and the error path is apart from the hot one, which so keeps no exception state.
import asyncio as _asyncio
from asyncio import protocols as _aio_protocols

cdef object _BufferedProtocol = _asyncio.BufferedProtocol
cdef object _feed_buffered = _aio_protocols._feed_data_to_buffered_proto


class LineProtocol(_asyncio.Protocol):
    """An asyncio.Protocol whose input is framed into lines in C: line_received(line) gets
    each complete line with its b"\\n" (and a last line without one at EOF).  A line longer
    than the server's max_line closes the connection."""

    max_line = 65536

    def line_received(self, line):
        pass

    def data_received(self, data):
        """Bytes of a stream the core does not frame (a TLS stream's plaintext, which
        asyncio's SSL layer hands over, or a stream of another event loop's), framed here by
        the same rules.  A line over max_line fails the stream (EMSGSIZE)."""
        partial = self.__dict__.pop("_kq_partial", b"")
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self.line_received(partial + data[start:end + 1])
            partial, start = b"", end + 1
        rest = partial + data[start:]
        if len(rest) > self.max_line:
            raise OSError(EMSGSIZE, f"a line longer than max_line ({self.max_line} bytes)")
        if rest:
            self._kq_partial = rest

    def _kq_end_of_input(self):
        """EOF on a stream this framed: its last line without a newline comes first."""
        partial = self.__dict__.pop("_kq_partial", b"")
        if partial:
            self.line_received(partial)


cdef object _protocol_method(protocol, str name):
    """protocol's method name as a function of two arguments (protocol, data): the class's
    own, so no bound method is kept per stream; a method set on the instance is bound."""
    bound = getattr(protocol, name, None)
    function = getattr(type(protocol), name, None)
    if getattr(bound, "__func__", None) is function and function is not None:
        return function
    return lambda _, data: bound(data)


cdef extern from *:
    """
    /* f(a, bytes(data[:n])) through f's vectorcall slot, which every Python function has
       (read inline: PyVectorcall_Function is a call of its own): the Python pass's
       data_received call, without the checks of a generic call.  A new reference, or NULL
       with the exception set, as the call's own result: the caller's error path is apart
       from its hot one. */
    static CYTHON_INLINE PyObject *kq_call_with_bytes(PyObject *f, PyObject *a,
                                                      const char *data, Py_ssize_t n) {
        PyObject *result, *args[2] = {a, PyBytes_FromStringAndSize(data, n)};
        PyTypeObject *type = Py_TYPE(f);
        vectorcallfunc call = NULL;
        if (args[1] == NULL) return NULL;
        if (PyType_HasFeature(type, Py_TPFLAGS_HAVE_VECTORCALL))
            call = *(vectorcallfunc *)((char *)f + type->tp_vectorcall_offset);
        result = call ? call(f, args, 2, NULL) : PyObject_Vectorcall(f, args, 2, NULL);
        Py_DECREF(args[1]);
        return result;
    }
    /* Re-raises the pending exception as a Cython function's failure. */
    static CYTHON_INLINE int kq_pending_error(void) { return -1; }
    """
    PyObject *call_with_bytes "kq_call_with_bytes"(object f, object a, const char *data,
                                                   Py_ssize_t n)
    int pending_error "kq_pending_error"() except -1
    void drop_reference "Py_DECREF"(PyObject *o)
