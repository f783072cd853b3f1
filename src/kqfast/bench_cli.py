"""kqfast-bench: an echo load generator on kqfast's C core, checking every echoed byte."""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from typing import Any

from kqfast import __version__
from kqfast._addresses import address_text
from kqfast._argtypes import count, seconds
from kqfast._bench import LoadClient

# The stderr lines that bracket the measured window (bench/run.py reads the server's CPU then).
MEASURING = "kqfast-bench: measuring"
DONE = "kqfast-bench: done"


# How long the end of a run waits for the replies still in flight before it closes.
DRAIN_SECONDS = 5.0


def _target(text: str) -> tuple[str, int]:
    """HOST:PORT, or a Unix socket path (anything with a "/"; its port is 0)."""
    if "/" in text:
        return text, 0
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT or a Unix socket path, e.g. 127.0.0.1:8080, [::1]:8080 or "
            f"/tmp/echo.sock, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _where(target: tuple[str, int]) -> str:
    host, port = target
    return host if "/" in host else address_text(host, port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kqfast-bench",
        description="Echo load generator: keeps PIPELINE messages of SIZE bytes (letters, then "
                    "a newline, so line echo servers work too) in flight on each connection, "
                    "checks every echoed byte, and reports round trips per second, latency "
                    "and its own CPU per request.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("target", type=_target, metavar="HOST:PORT",
                   help="the echo server: HOST:PORT (IPv6 as [::1]:8080) or a Unix socket "
                        "path (anything with a /)")
    p.add_argument("-c", "--connections", type=count(1), default=50,
                   help="client connections (default 50)")
    p.add_argument("-s", "--size", type=count(2), default=16,
                   help="bytes per message, newline included (default 16)")
    p.add_argument("-p", "--pipeline", type=count(1), default=1,
                   help="messages in flight per connection (default 1: ping-pong)")
    p.add_argument("-d", "--duration", type=seconds, default=5.0,
                   help="seconds measured (default 5)")
    p.add_argument("-w", "--warmup", type=seconds, default=1.0,
                   help="seconds run before measuring, once all are connected (default 1)")
    p.add_argument("--connect-timeout", type=seconds, default=30.0,
                   help="seconds allowed to open every connection (default 30)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return p


def raise_fd_limit(needed: int) -> None:
    """Lifts the soft fd limit toward the hard one when the connections need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def resolve(host: str, port: int) -> str:
    """The numeric address, looked up once rather than once per connection (a Unix socket
    path as it is)."""
    if "/" in host:
        return host
    try:
        return str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve host {host!r}: {exc.strerror}") from None


def connect_all(client: LoadClient, timeout: float) -> None:
    """Runs until every connection is open or has failed, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while client.pending and time.monotonic() < deadline:
        client.run(0.05)


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measure(client: LoadClient, duration: float) -> tuple[float, float, float]:
    """Runs the measured window one second at a time, with a progress line after each;
    returns (elapsed seconds, user CPU seconds, system CPU seconds)."""
    client.reset()
    client.take_interval()
    print(f"{MEASURING} for {duration:g} s", file=sys.stderr, flush=True)
    user0, sys0 = cpu_seconds()
    start = last = time.monotonic()
    end = start + duration
    while True:
        now = time.monotonic()
        if now >= end or not client.connected:
            break
        client.run(min(1.0, end - now))
        now = time.monotonic()
        window = client.take_interval()
        print(f"  {now - start:5.1f}s  {window['requests'] / (now - last):>12,.0f} req/s  "
              f"p50 {window['p50']:8.1f} µs  p99 {window['p99']:8.1f} µs  "
              f"open {client.connected}  errors {sum(client.errors.values())}",
              file=sys.stderr, flush=True)
        last = now
    elapsed = time.monotonic() - start
    user1, sys1 = cpu_seconds()
    print(DONE, file=sys.stderr, flush=True)
    return elapsed, user1 - user0, sys1 - sys0


def report(args: argparse.Namespace, connected: int, client: LoadClient, elapsed: float,
           user: float, system: float) -> dict[str, Any]:
    """The run's report, as --json prints it."""
    requests = client.requests
    per_request = (lambda seconds: seconds * 1e6 / requests) if requests else (lambda s: None)
    errors = client.errors
    return {
        "target": _where(args.target),
        "connections": args.connections,
        "connected": connected,
        "size": args.size,
        "pipeline": args.pipeline,
        "duration": elapsed,
        "requests": requests,
        "requests_per_second": requests / elapsed if elapsed else 0.0,
        "latency_us": client.latency(),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "first_error": os.strerror(client.first_error) if client.first_error else None,
        "client_cpu": {
            "user_s": user,
            "system_s": system,
            "user_us_per_request": per_request(user),
            "system_us_per_request": per_request(system),
        },
    }


def print_summary(r: dict[str, Any]) -> None:
    """The report for people."""
    lat, cpu = r["latency_us"], r["client_cpu"]
    print(f"kqfast-bench {r['target']}: {r['connected']}/{r['connections']} connections, "
          f"{r['size']} B messages, pipeline {r['pipeline']}, {r['duration']:.2f} s")
    print(f"  requests   {r['requests']:,}  ({r['requests_per_second']:,.0f} req/s)")
    print("  latency    " + "  ".join(f"{k} {lat[k]:,.1f}" for k in
                                      ("p50", "p90", "p99", "p99.9", "max")) + " µs")
    kinds = ", ".join(f"{k} {v}" for k, v in r["error_kinds"].items() if v)
    print(f"  errors     {r['errors']}" + (f" ({kinds})" if kinds else "")
          + (f"; first: {r['first_error']}" if r["first_error"] else ""))
    if r["requests"]:
        print(f"  client CPU {cpu['user_us_per_request']:.2f} user + "
              f"{cpu['system_us_per_request']:.2f} system µs/request")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_fd_limit(args.connections + 64)
    try:
        host = resolve(*args.target)
        client = LoadClient(host, args.target[1], args.connections, args.size, args.pipeline)
        connect_all(client, args.connect_timeout)
        connected = client.connected
        if not client.opened:
            err = client.first_error
            why = os.strerror(err) if err else "timed out"
            raise OSError(err, f"no connection to {_where(args.target)}: {why}")
        client.run(args.warmup)
        elapsed, user, system = measure(client, args.duration)
        # A clean end: the replies in flight are read, then each connection closes with a FIN
        # (a reset would have the server log ConnectionResetError for every connection).
        client.drain(DRAIN_SECONDS)
        client.close()
    except OSError as exc:
        print(f"kqfast-bench: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    result = report(args, connected, client, elapsed, user, system)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_summary(result)
    return 0 if result["errors"] == 0 and result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
