"""kqfast-echo: the tutorial's line-echo server, production grade."""
from __future__ import annotations

import argparse
import signal
import sys

import kqfast
from kqfast.argtypes import count, seconds
from kqfast.echo import EchoProtocol, LineEchoProtocol
from kqfast.prefork import ProcessGroup, reserve_port
from kqfast.server import Server, default_max_connections


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0-65535 (0 picks a free port)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kqfast-echo",
        description="Echo server on kqfast: line mode echoes every line until a blank one.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind, or a Unix socket path (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="0 picks a free port (default 8080)")
    p.add_argument("--mode", choices=("line", "raw"), default="line")
    p.add_argument("--handler", choices=("native", "python"), default="native",
                   help="native: in C without the GIL; python: the asyncio.Protocol API")
    p.add_argument("--workers", type=count(1), default=1,
                   help="event loops (threads) in each process")
    p.add_argument("--processes", type=count(1), default=1,
                   help="pre-forked server processes sharing the port (SO_REUSEPORT): the way "
                        "to use several cores with --handler python")
    p.add_argument("--backlog", type=count(1), default=1024)
    p.add_argument("--max-connections", type=count(1), default=None,
                   help="over it new clients are closed at once (default: what the fd limit "
                        f"allows, here {default_max_connections()})")
    p.add_argument("--max-line", type=count(1), default=65536,
                   help="longest line in bytes; a longer one closes its connection")
    p.add_argument("--idle-timeout", type=seconds, default=60.0,
                   help="close clients silent this long; 0 disables (default 60)")
    p.add_argument("--shutdown-timeout", type=seconds, default=5.0,
                   help="on SIGINT/SIGTERM, how long pending output may flush (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.processes > 1 and "/" in args.host:
        parser.error("--processes needs a TCP host: Unix sockets cannot share a path")
    if args.processes > 1:
        return _serve_processes(args)
    try:
        server = _make_server(args, args.port, reuse_port=False)
    except OSError as exc:
        return _fail(exc)
    _announce(args, server.address)
    return _serve(args, server)


def _make_server(args, port: int, reuse_port: bool) -> Server:
    handler: object
    if args.handler == "native":
        handler = kqfast.LINE_ECHO if args.mode == "line" else kqfast.ECHO
    else:
        handler = LineEchoProtocol if args.mode == "line" else EchoProtocol
    return Server(handler, args.host, port, workers=args.workers, backlog=args.backlog,
                  max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                  max_line=args.max_line, reuse_port=reuse_port)


def _serve(args, server: Server) -> int:
    """Serves until SIGINT/SIGTERM, which stop it gracefully."""
    def shut_down(signum, frame):
        server.stop(args.shutdown_timeout)

    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    try:
        server.serve_forever()
    except OSError as exc:
        return _fail(exc)
    return 0


def _serve_processes(args) -> int:
    try:
        holder, port = reserve_port(args.host, args.port)
    except OSError as exc:
        return _fail(exc)

    def serve_child(ready) -> int:
        try:
            server = _make_server(args, port, reuse_port=True)
        except OSError as exc:
            return _fail(exc)
        ready()
        return _serve(args, server)

    group = ProcessGroup(args.processes, serve_child)
    if not group.start():
        group.terminate()
        group.wait()
        holder.close()
        return 1
    holder.close()
    _announce(args, (args.host, port))
    return group.wait()


def _announce(args, address) -> None:
    """The ready line: tests and scripts wait for it on stderr."""
    if isinstance(address, str):
        where = address
    else:
        host, port = address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    processes = f", processes={args.processes}" if args.processes > 1 else ""
    print(f"kqfast-echo: listening on {where} (backend={kqfast.BACKEND}, handler={args.handler},"
          f" mode={args.mode}, workers={args.workers}{processes})", file=sys.stderr, flush=True)


def _fail(exc: OSError) -> int:
    """A runtime failure: one line naming the cause, exit status 1."""
    print(f"kqfast-echo: {exc.strerror or exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
