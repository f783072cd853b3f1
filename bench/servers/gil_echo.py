"""kqfast serving echo from its loop thread while another thread of the same process spins in
pure Python: does a CPU-bound Python thread cost the loop its round trips?  With the native
handler the loop never takes the GIL, so it should not; the Python handler is the control
(it needs the GIL for every batch).

Usage: gil_echo.py [--handler native|python] [--spin [--nice N]].  Prints kqfast-echo's
ready line on stderr.  The spinner can run at a lower priority (--nice 19) so that, sharing the
loop's CPU, it takes the GIL but almost no CPU time: what is left is the GIL's cost alone.
Each SIGUSR1 prints "spins COUNT MONOTONIC_SECONDS" on stdout, to time the spinner."""
import argparse
import os
import signal
import sys
import threading
import time

import kqfast
from kqfast._echo import EchoProtocol

spins = 0


def spin(nice: int) -> None:
    global spins
    # Linux applies a nice value to one thread when given its thread id.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    while True:
        spins += 1


def report(signum, frame) -> None:
    print(f"spins {spins} {time.monotonic()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handler", choices=("native", "python"), default="native")
    parser.add_argument("--spin", action="store_true", help="spin in pure Python meanwhile")
    parser.add_argument("--nice", type=int, default=0, help="the spinning thread's nice value")
    args = parser.parse_args()
    handler = kqfast.ECHO if args.handler == "native" else EchoProtocol
    server = kqfast.Server(handler, port=0).start()
    host, port = server.address
    signal.signal(signal.SIGUSR1, report)
    if args.spin:
        threading.Thread(target=spin, args=(args.nice,), daemon=True).start()
    print(f"gil_echo: listening on {host}:{port} (handler={args.handler}, spin={args.spin}, "
          f"nice={args.nice})", file=sys.stderr, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
