# asyncio.Handle objects made and run in C.  Every future's done-callback and every task step
# goes through loop.call_soon(); the standard library builds the Handle in Python and runs it
# through Handle._run() and Context.run(), which costs more than the callback often does.
# kqfast.Loop's call_soon() makes the very same asyncio.Handle (so cancel(), repr() and
# everything that inspects it are asyncio's), filling its slots directly, and run_once() runs
# it as Handle._run() would.  Debug mode keeps the standard library's path (it records where
# each handle was made), and so does a Python whose Handle is not the one this was written
# for (_asyncio_hooks: "handles"; kqfast.Loop then keeps asyncio's call_soon and friends).
import contextvars as _contextvars
from kqfast import _asyncio_hooks
import heapq as _heapq
from asyncio import format_helpers as _aio_format_helpers
from asyncio import tasks as _aio_tasks

from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_XDECREF

cdef extern from "Python.h":
    PyObject *PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t nitems) except NULL
    # PyContext_Enter without Cython's raise: -1 with the error set (not a Context, or one
    # already entered), which run_handle() hands to asyncio's own path.
    int context_enter "PyContext_Enter"(object context)
    void PyErr_Clear()
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef object _Handle = _asyncio.Handle
cdef object _TimerHandle = _asyncio.TimerHandle
cdef object _copy_context = _contextvars.copy_context
cdef object _format_callback_source = _aio_format_helpers._format_callback_source


cdef Py_ssize_t slot_offset(cls, str name) except -1:
    """Where the __slots__ member name lives in cls's instances."""
    descr = cls.__dict__[name]
    if type(descr).__name__ != "member_descriptor":
        raise TypeError(f"{cls.__name__}.{name} is not a slot")
    return (<PyMemberDescrObject *>descr).d_member.offset


cdef bint HANDLES_IN_C = _asyncio_hooks.usable("handles")
cdef Py_ssize_t H_CALLBACK, H_ARGS, H_CANCELLED, H_LOOP, H_SOURCE_TRACEBACK, H_REPR, H_CONTEXT
cdef Py_ssize_t T_WHEN, T_SCHEDULED
if HANDLES_IN_C:
    H_CALLBACK = slot_offset(_Handle, "_callback")
    H_ARGS = slot_offset(_Handle, "_args")
    H_CANCELLED = slot_offset(_Handle, "_cancelled")
    H_LOOP = slot_offset(_Handle, "_loop")
    H_SOURCE_TRACEBACK = slot_offset(_Handle, "_source_traceback")
    H_REPR = slot_offset(_Handle, "_repr")
    H_CONTEXT = slot_offset(_Handle, "_context")
    T_WHEN = slot_offset(_TimerHandle, "_when")
    T_SCHEDULED = slot_offset(_TimerHandle, "_scheduled")


cdef inline PyObject *slot_get(obj, Py_ssize_t offset) noexcept:
    """A borrowed reference to a slot's value (NULL when unset)."""
    return (<PyObject **>(<char *><PyObject *>obj + offset))[0]


cdef inline void slot_set(obj, Py_ssize_t offset, value) noexcept:
    cdef PyObject **where = <PyObject **>(<char *><PyObject *>obj + offset)
    cdef PyObject *old = where[0]
    Py_INCREF(value)
    where[0] = <PyObject *>value
    Py_XDECREF(old)


cdef object new_handle_for(callback, tuple args, loop, context, cls=_Handle):
    """asyncio.Handle(callback, args, loop, context) (or a TimerHandle's Handle part), as its
    __init__ makes it outside debug mode."""
    # Handle is a Python class: PyType_GenericAlloc is its tp_alloc (zeroed, GC-tracked).
    cdef object handle = <object>PyType_GenericAlloc(<PyTypeObject *>cls, 0)
    Py_DECREF(handle)  # the allocation's reference, now held by the variable
    slot_set(handle, H_CONTEXT, _copy_context() if context is None else context)
    slot_set(handle, H_LOOP, loop)
    slot_set(handle, H_CALLBACK, callback)
    slot_set(handle, H_ARGS, args)
    slot_set(handle, H_CANCELLED, False)
    slot_set(handle, H_REPR, None)
    slot_set(handle, H_SOURCE_TRACEBACK, None)
    return handle


def call_soon(self, callback, *args, context=None):
    """kqfast.Loop.call_soon: asyncio's, with the handle made in C."""
    cdef Reactor R = self._reactor
    if R.debug:
        return _BaseEventLoop.call_soon(self, callback, *args, context=context)
    return schedule_soon(R, self, callback, args, context)


def call_at(self, when, callback, *args, context=None):
    """kqfast.Loop.call_at: asyncio's, with the TimerHandle made in C."""
    cdef Reactor R = self._reactor
    if R.debug:
        return _BaseEventLoop.call_at(self, when, callback, *args, context=context)
    return schedule_at(R, self, when, callback, args, context)


def call_later(self, delay, callback, *args, context=None):
    """kqfast.Loop.call_later: call_at() on the loop's clock."""
    if delay is None:
        raise TypeError("delay must not be None")
    return call_at(self, kq_monotonic() + delay, callback, *args, context=context)


cdef object schedule_soon(Reactor R, loop, callback, tuple args, context):
    if R.closed:
        raise RuntimeError("Event loop is closed")
    handle = new_handle_for(callback, args, loop, context)
    R.ready_append(handle)
    return handle


cdef object schedule_at(Reactor R, loop, when, callback, tuple args, context):
    if when is None:
        raise TypeError("when cannot be None")
    if R.closed:
        raise RuntimeError("Event loop is closed")
    timer = new_handle_for(callback, args, loop, context, _TimerHandle)
    slot_set(timer, T_WHEN, when)
    slot_set(timer, T_SCHEDULED, True)
    heap_push(R.scheduled, timer)
    return timer


def create_future(self):
    """kqfast.Loop.create_future: asyncio's, without a Python frame (asyncio.futures.Future
    looked up each time, as asyncio does: tests swap in the pure-Python one)."""
    return _aio_futures.Future(loop=self)


def create_task(self, coro, **kwargs):
    """kqfast.Loop.create_task: asyncio's; without a task factory, the Task is made here.
    kwargs: what this Python's create_task takes (name, context, eager_start...), passed on
    only when given, as asyncio passes them to a task factory."""
    cdef Reactor R = self._reactor
    if R.debug or self._task_factory is not None:
        return _BaseEventLoop.create_task(self, coro, **kwargs)
    if R.closed:
        raise RuntimeError("Event loop is closed")
    return _aio_tasks.Task(coro, loop=self, **kwargs)


# The same as kqfast.Loop's methods: C methods (method descriptors, as the built-in types'
# are), which Python calls without the generic path a Cython function's *args and keywords
# take, several hundred instructions a call (asyncio calls call_soon for every future's
# callback and task step; uvicorn call_later and create_task for every request).  Their
# common shapes are taken here; any other goes to the functions above, which answer it as
# asyncio does.

cdef extern from *:
    """
    /* items[0:n] as a new tuple. */
    static PyObject *kq_tuple_of(PyObject *const *items, Py_ssize_t n) {
        PyObject *tuple = PyTuple_New(n);
        if (tuple == NULL) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_INCREF(items[i]);
            PyTuple_SET_ITEM(tuple, i, items[i]);
        }
        return tuple;
    }
    """
    tuple tuple_of "kq_tuple_of"(PyObject **items, Py_ssize_t n)
    Py_ssize_t tuple_size "PyTuple_GET_SIZE"(PyObject *tuple)
    PyObject *tuple_item "PyTuple_GET_ITEM"(PyObject *tuple, Py_ssize_t i)

cdef str _CONTEXT = "context"


cdef inline bint context_alone(PyObject *kwnames):
    """The keywords are context= or none (a keyword's name is interned as a rule)."""
    cdef PyObject *name
    if kwnames is NULL:
        return True
    if tuple_size(kwnames) != 1:
        return False
    name = tuple_item(kwnames, 0)
    return name == <PyObject *>_CONTEXT or <object>name == _CONTEXT


cdef object call_generally(function, object self, PyObject **args, Py_ssize_t nargs,
                           PyObject *kwnames):
    """function(self, *args, **keywords) for a call of any other shape."""
    cdef tuple names = () if kwnames is NULL else <tuple>kwnames
    keywords = {names[i]: <object>args[nargs + i] for i in range(len(names))}
    return function(self, *tuple_of(args, nargs), **keywords)


cdef object loop_call_soon(object self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    cdef Reactor R
    if nargs < 1 or not context_alone(kwnames):
        return call_generally(call_soon, self, args, nargs, kwnames)
    R = self._reactor
    if R.debug:
        return call_generally(call_soon, self, args, nargs, kwnames)
    return schedule_soon(R, self, <object>args[0], tuple_of(args + 1, nargs - 1),
                         None if kwnames is NULL else <object>args[nargs])


cdef object loop_call_at(object self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    cdef Reactor R
    if nargs < 2 or not context_alone(kwnames):
        return call_generally(call_at, self, args, nargs, kwnames)
    R = self._reactor
    if R.debug:
        return call_generally(call_at, self, args, nargs, kwnames)
    return schedule_at(R, self, <object>args[0], <object>args[1], tuple_of(args + 2, nargs - 2),
                       None if kwnames is NULL else <object>args[nargs])


cdef object loop_call_later(object self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    cdef Reactor R
    if nargs < 2 or not context_alone(kwnames) or args[0] == <PyObject *>None:
        return call_generally(call_later, self, args, nargs, kwnames)
    R = self._reactor
    if R.debug:
        return call_generally(call_later, self, args, nargs, kwnames)
    return schedule_at(R, self, kq_monotonic() + <object>args[0], <object>args[1],
                       tuple_of(args + 2, nargs - 2),
                       None if kwnames is NULL else <object>args[nargs])


cdef tuple _LOOP_KEYWORD = ("loop",)


cdef extern from "Python.h":
    PyObject *PyObject_Vectorcall(PyObject *f, PyObject **args, size_t nargs,
                                  PyObject *kwnames) except NULL


cdef object loop_create_task(object self, PyObject **args, Py_ssize_t nargs,
                             PyObject *kwnames):
    """create_task(coro), the coroutine alone: Task(coro, loop=self)."""
    cdef Reactor R
    cdef PyObject *call[2]
    if nargs != 1 or kwnames is not NULL:
        return call_generally(create_task, self, args, nargs, kwnames)
    R = self._reactor
    if R.debug or self._task_factory is not None or R.closed:
        return call_generally(create_task, self, args, nargs, kwnames)
    task_type = _aio_tasks.Task
    call[0], call[1] = args[0], <PyObject *>self
    task = <object>PyObject_Vectorcall(<PyObject *>task_type, call, 1, <PyObject *>_LOOP_KEYWORD)
    Py_DECREF(task)  # the call's reference, now held by the variable
    return task


cdef PyMethodDef _CALL_SOON = PyMethodDef(
    ml_name="call_soon", ml_meth=<PyCFunction>loop_call_soon,
    ml_flags=METH_FASTCALL | METH_KEYWORDS,
    ml_doc="call_soon($self, callback, *args, context=None)\n--\n\n"
           "kqfast.Loop.call_soon: asyncio's, with the handle made in C.")
cdef PyMethodDef _CALL_AT = PyMethodDef(
    ml_name="call_at", ml_meth=<PyCFunction>loop_call_at, ml_flags=METH_FASTCALL | METH_KEYWORDS,
    ml_doc="call_at($self, when, callback, *args, context=None)\n--\n\n"
           "kqfast.Loop.call_at: asyncio's, with the TimerHandle made in C.")
cdef PyMethodDef _CALL_LATER = PyMethodDef(
    ml_name="call_later", ml_meth=<PyCFunction>loop_call_later,
    ml_flags=METH_FASTCALL | METH_KEYWORDS,
    ml_doc="call_later($self, delay, callback, *args, context=None)\n--\n\n"
           "kqfast.Loop.call_later: call_at() on the loop's clock.")
cdef PyMethodDef _CREATE_TASK = PyMethodDef(
    ml_name="create_task", ml_meth=<PyCFunction>loop_create_task,
    ml_flags=METH_FASTCALL | METH_KEYWORDS,
    ml_doc="create_task($self, coro, **kwargs)\n--\n\n"
           "kqfast.Loop.create_task: asyncio's; without a task factory, the Task is made here.")
# Bound to asyncio's AbstractEventLoop, which kqfast.Loop (loop.py) derives from.
_loop_call_soon = PyDescr_NewMethod(<PyTypeObject *>_asyncio.AbstractEventLoop, &_CALL_SOON)
_loop_call_at = PyDescr_NewMethod(<PyTypeObject *>_asyncio.AbstractEventLoop, &_CALL_AT)
_loop_call_later = PyDescr_NewMethod(<PyTypeObject *>_asyncio.AbstractEventLoop, &_CALL_LATER)
_loop_create_task = PyDescr_NewMethod(<PyTypeObject *>_asyncio.AbstractEventLoop, &_CREATE_TASK)


cdef run_handle(handle):
    """Handle._run(), for a handle of exactly asyncio.Handle's type."""
    cdef object context = <object>slot_get(handle, H_CONTEXT)
    cdef object callback = <object>slot_get(handle, H_CALLBACK)
    cdef object args = <object>slot_get(handle, H_ARGS)
    if context_enter(context) < 0:
        # Not a Context, or one already entered: Handle._run() meets the same error in
        # context.run() and reports it as asyncio does (the exception handler, never out of
        # the loop), or runs a context-like object's own run().
        PyErr_Clear()
        handle._run()
        return
    try:
        callback(*args)
    except BaseException as exc:
        # Out of the context first, as Context.run() leaves it before Handle._run() reports
        # (Python 3.13 runs the exception handler in that very context).
        PyContext_Exit(context)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        report = {"message": f"Exception in callback {_format_callback_source(callback, args)}",
                  "exception": exc, "handle": handle}
        (<object>slot_get(handle, H_LOOP)).call_exception_handler(report)
        return
    PyContext_Exit(context)
