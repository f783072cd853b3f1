"""kqfast-echo: the tutorial's line-echo server, production grade."""
from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
import time
from typing import Callable

import kqfast
from kqfast._argtypes import count, host, port, seconds
from kqfast._echo import EchoProtocol, LineEchoProtocol
from kqfast._addresses import address_text
from kqfast._prefork import ProcessGroup, reserve_port
from kqfast._server import Server, ServerAddress, default_max_connections

# The connection limit's warnings: the counter is read this often, and a line written at most
# once per REJECTION_REPORT seconds, so that a flood of clients cannot flood stderr too.
REJECTION_CHECK = 1.0
REJECTION_REPORT = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kqfast-echo",
        description="Echo server on kqfast: line mode echoes every line until a blank one.")
    p.add_argument("--version", action="version", version=f"%(prog)s {kqfast.__version__}")
    p.add_argument("--host", type=host, default="127.0.0.1",
                   help="address or name to bind (IPv6 also as [::1]; a name binds every "
                        "address it resolves to, localhost 127.0.0.1 and ::1 where both are "
                        "configured), or a Unix socket path (default %(default)s)")
    p.add_argument("--port", type=port, default=8080,
                   help="0 picks a free port (default %(default)s)")
    p.add_argument("--mode", choices=("line", "raw"), default="line",
                   help="line: echo each line, a blank one closes; raw: echo every byte "
                        "(default %(default)s)")
    p.add_argument("--handler", choices=("native", "python"), default="native",
                   help="native: in C without the GIL; python: the asyncio.Protocol API "
                        "(default %(default)s)")
    p.add_argument("--workers", type=count(1), default=1,
                   help="event loops (threads) in each process (default %(default)s)")
    p.add_argument("--processes", type=count(1), default=1,
                   help="pre-forked server processes sharing the port (SO_REUSEPORT; TCP "
                        "only, not a Unix socket path): the way to use several cores with "
                        "--handler python (default %(default)s)")
    p.add_argument("--backlog", type=count(1), default=1024,
                   help="length of the queue of clients not yet accepted (default %(default)s)")
    p.add_argument("--max-connections", type=count(1), default=None,
                   help="over it new clients are closed at once (default "
                        f"{default_max_connections()}, what the fd limit allows)")
    p.add_argument("--max-line", type=count(1), default=65536,
                   help="longest line in bytes; a longer one closes its connection "
                        "(default %(default)s)")
    p.add_argument("--idle-timeout", type=seconds, default=60.0,
                   help="close clients silent this long; 0 disables (default %(default)g)")
    p.add_argument("--shutdown-timeout", type=seconds, default=5.0,
                   help="on SIGINT/SIGTERM, how long pending output may flush "
                        "(default %(default)g)")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="serve TLS with this certificate chain (PEM; needs --tls-key) "
                        "(default none: plain TCP)")
    p.add_argument("--tls-key", metavar="FILE",
                   help="the certificate's private key (PEM) (default none)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.processes > 1 and "/" in args.host:
        parser.error("--processes needs a TCP host: a Unix socket path has one listener, "
                     "which processes cannot share (use --workers)")
    try:
        if args.processes > 1:
            return _serve_processes(args)
        server = _make_server(args, args.port, reuse_port=False)
    except OSError as exc:
        return _fail(exc)
    return _serve(args, server, lambda: _announce(args, server.addresses))


def _make_server(args, port: int, reuse_port: bool) -> Server:
    handler: object
    if args.handler == "native":
        handler = kqfast.LINE_ECHO if args.mode == "line" else kqfast.ECHO
    else:
        handler = LineEchoProtocol if args.mode == "line" else EchoProtocol
    return Server(handler, args.host, port, workers=args.workers, backlog=args.backlog,
                  max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                  max_line=args.max_line, reuse_port=reuse_port, ssl=_tls_context(args))


def _tls_context(args) -> ssl.SSLContext | None:
    """--tls-cert/--tls-key as a server's context (ssl's defaults: TLS 1.2 and later).  A file
    that cannot be read or parsed is an OSError: one line naming it, exit status 1."""
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except ssl.SSLError as exc:
        raise OSError(f"cannot load --tls-cert {args.tls_cert} / --tls-key {args.tls_key}: "
                      f"{exc.reason or exc}") from exc
    except OSError as exc:
        raise OSError(f"cannot read {exc.filename or args.tls_cert}: {exc.strerror}") from exc
    return context


def _serve(args, server: Server, ready: Callable[[], None], log_shutdown: bool = True) -> int:
    """Serves until SIGINT/SIGTERM, which stop it gracefully; ready() once they would."""
    _stop_on_signals(lambda: server.stop(args.shutdown_timeout), log_shutdown)
    ready()
    rejections = _warn_of_rejections(server, args.max_connections or default_max_connections())
    try:
        server.serve_forever()
    except OSError as exc:
        return _fail(exc)
    finally:
        rejections.set()
    if log_shutdown:
        _say("stopped")
    return 0


def _serve_processes(args: argparse.Namespace) -> int:
    holders = reserve_port(args.host, args.port)
    addresses: list[ServerAddress] = [holder.getsockname()[:2] for holder in holders]
    port = holders[0].getsockname()[1]

    def serve_child(ready: Callable[[], None]) -> int:
        for holder in holders:
            holder.close()  # the parent's reservation, not this child's
        try:
            server = _make_server(args, port, reuse_port=True)
        except OSError as exc:
            return _fail(exc)
        # The parent says when the group shuts down, once for all of its children.
        return _serve(args, server, ready, log_shutdown=False)

    group = ProcessGroup(args.processes, serve_child, _say)
    _stop_on_signals(group.stop, log_shutdown=True)
    try:
        if group.start():
            _announce(args, addresses)
    finally:
        for holder in holders:
            holder.close()
    status = group.supervise()
    _say(group.failure or "stopped")
    return status


def _stop_on_signals(stop: Callable[[], None], log_shutdown: bool) -> None:
    """SIGINT and SIGTERM call stop() (idempotent); the first one also gets a line."""
    stopping = False

    def handle(signum, frame) -> None:
        nonlocal stopping
        if log_shutdown and not stopping:
            _say(f"shutting down ({signal.Signals(signum).name})")
        stopping = True
        stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def _warn_of_rejections(server: Server, limit: int) -> threading.Event:
    """Starts a thread that warns on stderr while the connection limit closes new clients at
    once: within REJECTION_CHECK seconds of the first, then at most one line every
    REJECTION_REPORT seconds, with the count since the last line.  (The native loops run in
    C, with no timers of the CLI's.)  Setting the returned event ends the thread."""
    done = threading.Event()

    def watch() -> None:
        reported, last_line = 0, -float("inf")
        while not done.wait(REJECTION_CHECK):
            rejected = server._rejected()
            now = time.monotonic()
            if rejected > reported and now - last_line >= REJECTION_REPORT:
                new = rejected - reported
                _say(f"{new} new client{'s' if new != 1 else ''} closed at once: over the "
                     f"connection limit (--max-connections {limit})")
                reported, last_line = rejected, now

    threading.Thread(target=watch, name="kqfast-echo-rejections", daemon=True).start()
    return done


def _announce(args: argparse.Namespace, addresses: list[ServerAddress]) -> None:
    """The ready line: tests and scripts wait for it on stderr."""
    where = " and ".join(address if isinstance(address, str) else address_text(*address)
                         for address in addresses)
    processes = f", processes={args.processes}" if args.processes > 1 else ""
    tls = ", tls" if args.tls_cert else ""
    _say(f"listening on {where} (backend={kqfast.BACKEND}, handler={args.handler},"
         f" mode={args.mode}, workers={args.workers}{processes}{tls})")


def _say(line: str) -> None:
    """One line on stderr, in one write(2): the signal handler says "shutting down" too, and
    a signal landing while sys.stderr is mid-write would make its buffered writer raise
    (reentrant call) in the interrupted print."""
    os.write(sys.stderr.fileno(), f"kqfast-echo: {line}\n".encode(errors="replace"))


def _fail(exc: OSError) -> int:
    """A runtime failure: one line naming the cause, exit status 1."""
    _say(exc.strerror or str(exc))
    return 1


if __name__ == "__main__":
    sys.exit(main())
