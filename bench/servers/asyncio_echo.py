"""The asyncio.Protocol echo on any asyncio event loop (--loop asyncio|uvloop|rloop|kqfast),
serving the very protocol class kqfast-echo --handler python runs (kqfast._echo.EchoProtocol,
a plain asyncio.Protocol), so only the loop under it differs.  --aiofastnet serves it through
aiofastnet's create_server (its C transports) on that loop; --tls CERT KEY serves TLS.

Usage: asyncio_echo.py [--loop NAME] [--aiofastnet] [--tls CERT KEY] [PORT].  Prints
kqfast-echo's ready line on stderr (port 0, the default, picks a free port)."""
import argparse
import asyncio
import ssl
import sys

from _loops import LOOPS, forever, run
from kqfast._echo import EchoProtocol


def server_context(tls):
    """The server's ssl.SSLContext for --tls CERT KEY, or None."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls)
    return context


async def serve(name: str, port: int, aiofastnet: bool, tls) -> None:
    loop = asyncio.get_running_loop()
    context = server_context(tls)
    if aiofastnet:
        import aiofastnet as fastnet
        server = await fastnet.create_server(loop, EchoProtocol, "127.0.0.1", port,
                                             backlog=1024, ssl=context)
    else:
        server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=1024,
                                          ssl=context)
    print(f"{name}_echo: listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}",
          file=sys.stderr, flush=True)
    await forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--aiofastnet", action="store_true", help="aiofastnet's transports")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve TLS")
    parser.add_argument("port", type=int, nargs="?", default=0)
    args = parser.parse_args()
    run(lambda: serve(args.loop, args.port, args.aiofastnet, args.tls), args.loop)


if __name__ == "__main__":
    main()
