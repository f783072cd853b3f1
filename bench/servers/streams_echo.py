"""The streams echo on any asyncio event loop (--loop asyncio|uvloop|rloop|kqfast):
asyncio.start_server, and per connection a coroutine that reads what has arrived (up to
64 KiB), writes it back and awaits drain(), the way stream servers are written.

Usage: streams_echo.py [--loop NAME] [PORT].  Prints kqfast-echo's ready line on stderr
(port 0, the default, picks a free port)."""
import argparse
import asyncio
import socket
import sys

from _loops import LOOPS, forever, run


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(name: str, port: int) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=1024)
    print(f"{name}_streams_echo: listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}",
          file=sys.stderr, flush=True)
    await forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("port", type=int, nargs="?", default=0)
    args = parser.parse_args()
    run(lambda: serve(args.loop, args.port), args.loop)


if __name__ == "__main__":
    main()
