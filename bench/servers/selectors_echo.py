"""The baseline kqfast exists to beat: a raw echo server in pure Python on the standard
library's selectors (epoll/kqueue underneath, every event handled in Python).

Usage: selectors_echo.py [PORT].  Prints kqfast-echo's ready line on stderr (port 0, the
default, picks a free port)."""
import selectors
import socket
import sys


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0),
                                    backlog=1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    unsent: dict[socket.socket, bytes] = {}  # what the kernel did not take; reading waits
    print(f"selectors_echo: listening on 127.0.0.1:{listener.getsockname()[1]}",
          file=sys.stderr, flush=True)

    def drop(sock: socket.socket) -> None:
        selector.unregister(sock)
        unsent.pop(sock, None)
        sock.close()

    while True:
        for key, events in selector.select():
            sock = key.fileobj
            if sock is listener:
                while True:
                    try:
                        client, _ = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    selector.register(client, selectors.EVENT_READ)
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    data = unsent.pop(sock)
                else:
                    data = sock.recv(65536)
                    if not data:
                        drop(sock)
                        continue
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                drop(sock)
                continue
            if sent < len(data):
                unsent[sock] = data[sent:]
                selector.modify(sock, selectors.EVENT_WRITE)
            elif events & selectors.EVENT_WRITE:
                selector.modify(sock, selectors.EVENT_READ)


if __name__ == "__main__":
    main()
