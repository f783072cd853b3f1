"""The private pieces of asyncio that kqfast.Loop overrides or reads, each checked against the
running standard library when kqfast is imported.

kqfast.Loop is the standard library's Unix selector loop with some private methods replaced
(how servers accept, how transports are made, the iteration) and some private objects read or
built in C (Handle's slots, the loop's own state).  None of that is public API, and each
CPython release may change it.  So each piece is checked here by feature, not by version: the
signature it has, the slots it keeps, the names its code uses.  A piece that is not what kqfast
was written for is left to the standard library (Loop does not override it: slower, correct),
and MISMATCHES names it, which tests/test_asyncio_hooks.py turns into a failing test.  A new
Python shows up as a failing test, never as a broken server."""
from __future__ import annotations

import asyncio
import inspect
import logging
from asyncio import base_events, events, protocols, sslproto, transports, unix_events
from typing import Callable

__all__ = ["MISMATCHES", "FALLBACK_METHODS", "usable", "mismatch"]

# hook -> what is different about it on this Python.
MISMATCHES: dict[str, str] = {}
# Loop methods left to the standard library because a hook they rely on mismatched.
FALLBACK_METHODS: set[str] = set()

_Loop = unix_events._UnixSelectorEventLoop  # asyncio.SelectorEventLoop on Unix
_Base = base_events.BaseEventLoop


def _parameters(function: Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(function).parameters.values())[1:]  # without self


def _takes(function: Callable, positional: tuple[str, ...], keyword: tuple[str, ...]) -> str:
    """'' when function's parameters are among ours: positional ones in our order, then
    keyword-only ones we know; else what differs.  New trailing parameters of a later Python
    are what breaks an override (3.15 passes context= to _start_serving)."""
    params = _parameters(function)
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    kwonly = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    others = [p.name for p in params if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if others or names != list(positional[:len(names)]) or not set(kwonly) <= set(keyword):
        return f"takes {inspect.signature(function)}"
    return ""


def _uses_only(function: Callable, known: set[str]) -> str:
    """'' when function's code names nothing beyond known (attributes and globals)."""
    extra = set(function.__code__.co_names) - known
    return f"also uses {sorted(extra)}" if extra else ""


_SERVE = ("protocol_factory", "sock", "sslcontext", "server", "backlog",
          "ssl_handshake_timeout", "ssl_shutdown_timeout", "context")
_SOCKET_TRANSPORT = (("sock", "protocol", "waiter"), ("extra", "server", "context"))
_SSL_TRANSPORT = (("rawsock", "protocol", "sslcontext", "waiter"),
                  ("server_side", "server_hostname", "extra", "server", "ssl_handshake_timeout",
                   "ssl_shutdown_timeout", "call_connection_made", "context"))
_SSL_PROTOCOL = ("loop", "app_protocol", "sslcontext", "waiter", "server_side",
                 "server_hostname", "call_connection_made", "ssl_handshake_timeout",
                 "ssl_shutdown_timeout")
_HANDLE_SLOTS = {"_callback", "_args", "_cancelled", "_loop", "_source_traceback", "_repr",
                 "__weakref__", "_context"}
# What Handle._run does, by the names it uses (3.13 added get_debug for the message).
_HANDLE_RUN = {"_context", "run", "_callback", "_args", "SystemExit", "KeyboardInterrupt",
               "BaseException", "format_helpers", "_format_callback_source", "_loop",
               "get_debug", "_source_traceback", "call_exception_handler"}
# What _run_once reads and does (3.15 added max(resolution, math.ulp(now)) for end_time).
_RUN_ONCE = {"len", "_scheduled", "_MIN_SCHEDULED_TIMER_HANDLES", "_timer_cancelled_count",
             "_MIN_CANCELLED_TIMER_HANDLES_FRACTION", "_cancelled", "append", "heapq",
             "heapify", "heappop", "_ready", "_stopping", "_when", "min", "max", "time",
             "MAXIMUM_SELECT_TIMEOUT", "_selector", "select", "_process_events",
             "_clock_resolution", "math", "ulp", "range", "popleft", "_debug",
             "_current_handle", "_run", "slow_callback_duration", "logger", "warning",
             "_format_handle"}
# What sets and clears the running thread (run_forever, or its setup and cleanup on 3.13+).
_RUN_FOREVER = {"_check_closed", "_check_running", "_set_coroutine_origin_tracking", "_debug",
                "sys", "get_asyncgen_hooks", "_old_agen_hooks", "threading", "get_ident",
                "_thread_id", "set_asyncgen_hooks", "_asyncgen_firstiter_hook",
                "_asyncgen_finalizer_hook", "events", "_set_running_loop", "_run_once",
                "_stopping", "_run_forever_setup", "_run_forever_cleanup"}


def _handles() -> str:
    slots = set(events.Handle.__slots__)
    if slots != _HANDLE_SLOTS:
        return f"Handle.__slots__ is {sorted(slots)}"
    if set(events.TimerHandle.__slots__) != {"_when", "_scheduled"}:
        return f"TimerHandle.__slots__ is {sorted(events.TimerHandle.__slots__)}"
    if asyncio.Handle is not events.Handle or asyncio.TimerHandle is not events.TimerHandle:
        return "asyncio.Handle is not asyncio.events.Handle"
    return _uses_only(events.Handle._run, _HANDLE_RUN)


def _iteration() -> str:
    why = _uses_only(_Base._run_once, _RUN_ONCE)
    if why:
        return "_run_once " + why
    for name in ("_MIN_SCHEDULED_TIMER_HANDLES", "_MIN_CANCELLED_TIMER_HANDLES_FRACTION",
                 "MAXIMUM_SELECT_TIMEOUT", "_format_handle"):
        if not hasattr(base_events, name):
            return f"base_events.{name} is gone"
    # kqfast's _run_once runs every iteration of a run_forever: that must be what
    # run_forever does with it, until _stopping.
    if not {"_run_once", "_stopping"} <= set(_Base.run_forever.__code__.co_names):
        return "run_forever does not loop on _run_once until _stopping"
    for name in ("run_forever", "_run_forever_setup", "_run_forever_cleanup"):
        function = getattr(_Base, name, None)
        why = function and _uses_only(function, _RUN_FOREVER)
        if why:
            return f"{name} {why}"
    return _uses_only(_Base._timer_handle_cancelled, {"_scheduled", "_timer_cancelled_count"})


def _streams() -> str:
    """What kqfast.Transport and its streams take from asyncio's transports and servers."""
    if set(getattr(transports._FlowControlMixin, "__slots__", ())) != {
            "_loop", "_protocol_paused", "_high_water", "_low_water"}:
        return "_FlowControlMixin's slots changed"
    if not hasattr(protocols, "_feed_data_to_buffered_proto"):
        return "protocols._feed_data_to_buffered_proto is gone"
    if not hasattr(getattr(asyncio, "constants", None), "_SendfileMode"):
        return "constants._SendfileMode is gone"
    for name in ("_attach", "_detach"):
        if len(_parameters(getattr(base_events.Server, name))) > 1:
            return f"Server.{name} takes {inspect.signature(getattr(base_events.Server, name))}"
    return (_takes(_Loop._make_socket_transport, *_SOCKET_TRANSPORT)
            or _takes(_Loop._ensure_fd_no_transport, ("fd",), ()))


def _serving() -> str:
    return (_takes(_Loop._start_serving, _SERVE, ())
            or _takes(_Loop._stop_serving, ("sock",), ()))


def _tls() -> str:
    return (_takes(_Loop._make_ssl_transport, *_SSL_TRANSPORT)
            or _takes(sslproto.SSLProtocol.__init__, _SSL_PROTOCOL, ()))


# The TLS engine (tls_link.pxi, tls_protocol.pxi) takes over asyncio's SSLProtocol by
# changing the class of an instance: sound while its state is all in the instance's __dict__.
# It runs the SSLProtocol's per-record steps itself (the read step, the app's write, what
# follows each), so those steps must be what it was written for, name for name; and it reads
# the state those steps keep.
_SSL_STATES = {"UNWRAPPED", "DO_HANDSHAKE", "WRAPPED", "FLUSHING", "SHUTDOWN"}
_SSL_STEPS = {
    "_do_read": {"Exception", "FLUSHING", "SSLProtocolState", "WRAPPED",
                 "_app_protocol_is_buffer", "_app_reading_paused", "_control_ssl_reading",
                 "_do_read__buffered", "_do_read__copied", "_do_write", "_fatal_error",
                 "_process_outgoing", "_state", "_write_backlog"},
    "_do_read__copied": {"SSLAgainErrors", "_app_protocol", "_call_eof_received", "_sslobj",
                         "_start_shutdown", "append", "data_received", "join", "max_size",
                         "read"},
    "_write_appdata": {"Exception", "FLUSHING", "LOG_THRESHOLD_FOR_CONNLOST_WRITES", "SHUTDOWN",
                       "SSLProtocolState", "UNWRAPPED", "WRAPPED", "_conn_lost", "_do_write",
                       "_fatal_error", "_state", "_write_backlog", "_write_buffer_size",
                       "append", "constants", "len", "logger", "warning"},
    "_do_write": {"SSLAgainErrors", "_process_outgoing", "_sslobj", "_write_backlog",
                  "_write_buffer_size", "len", "write"},
    "_process_outgoing": {"_control_app_writing", "_outgoing", "_ssl_writing_paused",
                          "_transport", "len", "read", "write"},
    "_control_app_writing": {"BaseException", "KeyboardInterrupt", "SystemExit",
                             "_app_protocol", "_app_transport", "_app_writing_paused",
                             "_get_write_buffer_size", "_loop", "_outgoing_high_water",
                             "_outgoing_low_water", "call_exception_handler", "pause_writing",
                             "resume_writing"},
    "_control_ssl_reading": {"_get_read_buffer_size", "_incoming_high_water",
                             "_incoming_low_water", "_ssl_reading_paused", "_transport",
                             "pause_reading", "resume_reading"},
    "buffer_updated": {"DO_HANDSHAKE", "FLUSHING", "SHUTDOWN", "SSLProtocolState", "WRAPPED",
                       "_do_flush", "_do_handshake", "_do_read", "_do_shutdown", "_incoming",
                       "_ssl_buffer_view", "_state", "write"},
    "_get_write_buffer_size": {"_outgoing", "_write_buffer_size", "pending"},
    "_get_read_buffer_size": {"_incoming", "pending"},
}
_SSL_STATE = {"_state", "_app_reading_paused", "_ssl_writing_paused", "_app_writing_paused",
              "_ssl_reading_paused", "_write_backlog", "_outgoing_high_water",
              "_outgoing_low_water", "_incoming_high_water", "_incoming_low_water", "_sslobj",
              "_incoming", "_outgoing", "_server_hostname", "_app_transport"}
# The SSLProtocol methods the engine extends (asyncio's, then a sync), by their arguments.
_SSL_EXTENDED = {"connection_made": ("transport",), "connection_lost": ("exc",),
                 "_set_state": ("new_state",), "_set_app_protocol": ("app_protocol",),
                 "_pause_reading": (), "_resume_reading": (), "pause_writing": (),
                 "resume_writing": (), "_set_write_buffer_limits": ("high", "low"),
                 "_set_read_buffer_limits": ("high", "low"),
                 "_write_appdata": ("list_of_data",), "_fatal_error": ("exc", "message"),
                 "_call_eof_received": ()}


def _tls_engine() -> str:
    """'' also for Python 3.10's SSLProtocol, an older design (no state machine), which the
    engine does not take over: TLS there is asyncio's over a core stream (tls_link.pxi)."""
    protocol, transport = sslproto.SSLProtocol, sslproto._SSLProtocolTransport
    if not hasattr(sslproto, "SSLProtocolState"):
        return ""
    states = {state.name for state in sslproto.SSLProtocolState}
    if states != _SSL_STATES:
        return f"has states {sorted(states)}"
    for cls in (protocol, transport):
        if "__slots__" in vars(cls):
            return f"{cls.__name__} has __slots__"
    for name, known in _SSL_STEPS.items():
        why = _uses_only(getattr(protocol, name), known)
        if why:
            return f"{name} {why}"
    for name, arguments in _SSL_EXTENDED.items():
        why = _takes(getattr(protocol, name), arguments, ())
        if why:
            return f"{name} {why}"
    missing = _SSL_STATE - set(protocol.__init__.__code__.co_names)
    if missing or "_app_protocol_is_buffer" not in protocol._set_app_protocol.__code__.co_names:
        return f"no longer keeps {sorted(missing) or ['_app_protocol_is_buffer']}"
    return (_takes(transport._test__append_write_backlog, ("data",), ())
            or _uses_only(transport.write, {"TypeError", "__name__", "_ssl_protocol",
                                            "_write_appdata", "bytearray", "bytes",
                                            "isinstance", "memoryview", "type"}))


def _connect() -> str:
    return _takes(_Loop._sock_connect_cb, ("fut", "sock", "address"), ())


# hook -> (its check, the Loop methods that rely on it).  A method relying on several hooks
# falls back when any of them mismatches.
_HOOKS: dict[str, tuple[Callable[[], str], tuple[str, ...]]] = {
    "handles": (_handles, ("call_soon", "call_at", "call_later")),
    "iteration": (_iteration, ("_run_once", "_timer_handle_cancelled")),
    "streams": (_streams, ("_make_socket_transport", "_make_ssl_transport", "_start_serving",
                           "_stop_serving")),
    "serving": (_serving, ("_start_serving", "_stop_serving")),
    "tls": (_tls, ("_make_ssl_transport",)),
    # (No Loop method: the engine asks usable("tls engine") and leaves TLS to asyncio's
    # SSLProtocol over a core stream when it is not.)
    "tls engine": (_tls_engine, ()),
    "connect": (_connect, ("_sock_connect_cb",)),
}


def usable(hook: str) -> bool:
    """Whether kqfast may use its own version of hook on this Python."""
    return hook not in MISMATCHES


def mismatch(hook: str) -> str:
    """What is different about hook on this Python ("" when nothing is)."""
    return MISMATCHES.get(hook, "")


for _hook, (_check, _methods) in _HOOKS.items():
    try:
        _why = _check()
    except (AttributeError, TypeError, ValueError) as exc:
        _why = f"cannot be checked: {exc!r}"
    if _why:
        MISMATCHES[_hook] = _why
        FALLBACK_METHODS.update(_methods)
if MISMATCHES:
    logging.getLogger("kqfast").debug(
        "kqfast: asyncio's %s differ(s) from what kqfast was written for; the standard "
        "library's path is used for them: %s", ", ".join(MISMATCHES), MISMATCHES)
