"""kqfast.Server: listeners, loops and their threads, behind asyncio-like lifecycle calls."""
from __future__ import annotations

import resource
import sys
import threading

from kqfast._core import Loop, _listen_fd

# fds kept back from max_connections for listeners, the poller, the reserve fd and the rest
# of the process.
_FD_HEADROOM = 32


def default_balance() -> str:
    """Linux and FreeBSD (SO_REUSEPORT_LB) spread connections over SO_REUSEPORT listeners;
    elsewhere (macOS) every connection would go to one listener, so one loop accepts and
    hands connections to the others."""
    return "reuseport" if sys.platform.startswith(("linux", "freebsd")) else "handoff"


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - _FD_HEADROOM)


class Server:
    """A TCP (or Unix socket) server.  handler is kqfast.ECHO or kqfast.LINE_ECHO (native,
    never take the GIL) or a protocol factory: anything returning an asyncio.Protocol-like
    object.  The socket is bound here, so `address` is known before serving."""

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 8080, *, workers: int = 1,
                 backlog: int = 1024, max_connections: int | None = None,
                 idle_timeout: float | None = 60.0, max_line: int = 65536,
                 high_water: int = 65536, low_water: int = 16384, reuse_port: bool = False,
                 max_output: int = 16 * 1024 * 1024, linger_timeout: float = 2.0,
                 balance: str | None = None):
        balance = balance or default_balance()
        if balance not in ("reuseport", "handoff"):
            raise ValueError(f"balance must be 'reuseport' or 'handoff', not {balance!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, not {max_line}")
        if not high_water >= low_water >= 0:
            raise ValueError("high_water must be >= low_water >= 0")
        if max_output < high_water:
            raise ValueError("max_output must be >= high_water")
        if max_connections is None:
            max_connections = default_max_connections()
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        settings = dict(max_line=max_line, high_water=high_water, low_water=low_water,
                        max_output=max_output, idle_timeout=idle_timeout or 0.0,
                        linger_timeout=linger_timeout, max_connections=max_connections)
        self._loops: list[Loop] = []
        self._threads: list[threading.Thread] = []
        self._started = False
        # With "reuseport" each loop owns a listener on the shared port and the kernel spreads
        # new connections; with "handoff" the first loop owns the only listener.
        per_loop_listener = balance == "reuseport"
        share_port = reuse_port or (workers > 1 and per_loop_listener)
        try:
            for i in range(workers):
                loop = Loop()
                self._loops.append(loop)
                if i == 0 or per_loop_listener:
                    fd, family = _listen_fd(host, port, backlog, share_port)
                    if port == 0:
                        port = self._bound_address(fd, family)[1]
                else:
                    fd = -1
                    loop.open_inbox()
                loop.configure(fd, family, handler, **settings)
            if workers > 1 and not per_loop_listener:
                self._loops[0].hand_off_to(self._loops)
        except BaseException:
            for loop in self._loops:
                loop.close()
            raise
        self.address = self._bound_address(self._loops[0].listen_fileno, family)

    @staticmethod
    def _bound_address(fd: int, family: int):
        import socket
        s = socket.socket(family, socket.SOCK_STREAM, fileno=fd)
        try:
            name = s.getsockname()
        finally:
            s.detach()
        return name if isinstance(name, str) else (name[0], name[1])

    def serve_forever(self) -> None:
        """Serves in this thread (and one more thread per extra worker) until stop().
        Ctrl-C stops cleanly, then raises KeyboardInterrupt."""
        self._check_not_started()
        self._spawn(self._loops[1:])
        try:
            self._loops[0].run()
        finally:
            for loop in self._loops[1:]:
                loop.request_stop(0.0)
            for thread in self._threads:
                thread.join()

    def start(self) -> "Server":
        """Serves from background threads; returns at once, already listening."""
        self._check_not_started()
        self._spawn(self._loops)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Thread-safe and idempotent: stop accepting, let pending output flush for up to
        timeout seconds, then close.  From a loop's own thread (a callback, a signal
        handler) it only asks; elsewhere it also waits for the loops to finish."""
        if not self._started:
            for loop in self._loops:
                loop.close()
            return
        for loop in self._loops:
            loop.request_stop(timeout)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()

    def call_soon_threadsafe(self, callback, *args) -> None:
        """Runs callback(*args) on the (first) loop's thread."""
        self._loops[0].call_soon_threadsafe(callback, *args)

    def stats(self) -> dict:
        """Counters summed over the loops, and each loop's own under "loops"."""
        per_loop = [loop.stats() for loop in self._loops]
        total = {key: sum(s[key] for s in per_loop) for key in per_loop[0]}
        total["loops"] = per_loop
        return total

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _check_not_started(self) -> None:
        if self._started:
            raise RuntimeError("this server is already serving (or has served)")
        self._started = True

    def _spawn(self, loops) -> None:
        for loop in loops:
            thread = threading.Thread(target=self._run_loop, args=(loop,),
                                      name="kqfast-loop", daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _run_loop(loop: Loop) -> None:
        try:
            loop.run()
        except BaseException:
            import logging
            logging.getLogger("kqfast").exception("kqfast: a loop thread stopped on an error")


def serve(handler, host: str = "127.0.0.1", port: int = 8080, **kwargs) -> None:
    """Server(handler, host, port, **kwargs).serve_forever()."""
    Server(handler, host, port, **kwargs).serve_forever()
