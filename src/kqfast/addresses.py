"""Addresses as kqfast's listeners take them: resolving a host (a clear error for a name that
does not resolve), printing host:port, and checking that no other server holds a port."""
from __future__ import annotations

import socket
import sys

# The option kqfast's own shared listeners set (netio.c): on FreeBSD the load-balancing
# SO_REUSEPORT_LB, which only sockets with that same option can join; Python names it from
# 3.14 on (sys/socket.h: 0x10000).
_SHARE_PORT = getattr(socket, "SO_REUSEPORT_LB",
                      0x10000 if sys.platform.startswith("freebsd") else socket.SO_REUSEPORT)


def address_text(host: str, port: int) -> str:
    """host:port as kqfast-echo prints it, IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of the address kqfast's listeners bind for host (the resolver's
    first answer).  A name that does not resolve is an OSError saying so: the listeners
    themselves can only report it as "Cannot assign requested address"."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve host {host!r}: {exc.strerror}") from None
    return family, sockaddr


def check_port_free(host: str, port: int) -> None:
    """Raises the address-in-use OSError when another server listens on host:port, even one
    whose SO_REUSEPORT listeners this user could join (and silently take part of its clients).

    The probe binds a socket with SO_REUSEADDR, as kqfast's listeners have, and without
    SO_REUSEPORT.  On Linux that bind fails while any socket listens on an overlapping
    address and port; on FreeBSD and macOS, while any socket is bound to exactly that address
    and port.  Either way it fails exactly where a plain, single-listener kqfast-echo would,
    and connections left in TIME_WAIT by an earlier server do not count.  (A connection
    attempt instead would be a client of the other server, and a full backlog or a filtered
    port would pass for a free one.)  Port 0 needs no probe: the kernel picks one no socket
    uses."""
    if port != 0:
        bound_socket(host, port, share=False).close()


def bound_socket(host: str, port: int, share: bool) -> socket.socket:
    """A socket bound, not listening, to host:port with the options of kqfast's listeners:
    SO_REUSEADDR (connections in TIME_WAIT do not block the port), IPV6_V6ONLY, and the
    port-sharing option when share."""
    family, sockaddr = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, _SHARE_PORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address_text(host, port)}: "
                                 f"{exc.strerror}") from None
    return sock
