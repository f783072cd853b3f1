"""uvicorn + httptools serving an ASGI hello world on any asyncio event loop
(--loop asyncio|uvloop|rloop|kqfast), for wrk.

Usage: uvicorn_hello.py [--loop NAME] [PORT].  Binds the port itself (0, the default, picks a
free one), prints kqfast-echo's ready line on stderr once uvicorn has started, and serves in
this one process: no workers, no reload, no access log.  The loop is handed to uvicorn as a
factory (uvicorn >= 0.36 takes `loop="module:attr"`; older ones get the loop installed here)."""
import argparse
import socket
import sys

import uvicorn

from _loops import FACTORIES, LOOPS, run

BODY = b"Hello, world!"


async def app(scope, receive, send):
    if scope["type"] != "http":  # lifespan: nothing to set up
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})


class Server(uvicorn.Server):
    address = ("127.0.0.1", 0)

    async def startup(self, sockets=None):
        await super().startup(sockets)  # some loops take the socket over: its name is kept
        host, port = self.address
        print(f"uvicorn_hello: listening on {host}:{port} (uvicorn {uvicorn.__version__}, "
              f"loop={self.config.loop})", file=sys.stderr, flush=True)


def uvicorn_takes_factories() -> bool:
    parts = uvicorn.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (0, 36)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("port", type=int, nargs="?", default=0)
    args = parser.parse_args()
    # proto IPPROTO_TCP, as loop.create_server makes them: asyncio sets TCP_NODELAY only on
    # sockets that say so (socket.create_server's say 0), and without it every response
    # written in two parts waits 40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    module, attr, _ = FACTORIES[args.loop]
    takes = uvicorn_takes_factories()
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False,
                            log_level="warning", loop=f"{module}:{attr}" if takes else "none")
    server = Server(config)
    server.address = sock.getsockname()[:2]
    if takes:
        server.run(sockets=[sock])
    else:  # uvicorn < 0.36: its loop setting knows no factories; run it on ours
        config.setup_event_loop = lambda: None
        run(lambda: server.serve(sockets=[sock]), args.loop)


if __name__ == "__main__":
    main()
