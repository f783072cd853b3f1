"""Addresses as kqfast's listeners take them: resolving a host into every address a server
binds (a clear error for a name that does not resolve), printing host:port, and checking that
no other server holds a port."""
from __future__ import annotations

import errno
import socket
import sys
from typing import Callable, NamedTuple

# The option kqfast's own shared listeners set (netio.c): on FreeBSD the load-balancing
# SO_REUSEPORT_LB, which only sockets with that same option can join; Python names it from
# 3.14 on (sys/socket.h: 0x10000).
_SHARE_PORT = getattr(socket, "SO_REUSEPORT_LB",
                      0x10000 if sys.platform.startswith("freebsd") else socket.SO_REUSEPORT)

# A bind that fails with one of these means this machine has no such address (an IPv6 name
# on a host without IPv6): for a name or None, that address is left out if another is bound.
ADDRESS_UNAVAILABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


class Address(NamedTuple):
    """One address to bind: its family and the numeric host the listener is given."""
    family: int
    host: str


def address_text(host: str, port: int) -> str:
    """host:port as kqfast-echo prints it, IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str | None, port: int) -> list[Address]:
    """Every address a server binds for host, as asyncio's create_server does: an address is
    itself, a name every address it resolves to (localhost: 127.0.0.1 and ::1), None every
    interface (0.0.0.0 and ::).  A name that does not resolve is an OSError saying so: the
    listeners themselves could only report it as "Cannot assign requested address"."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve host {host!r}: {exc.strerror}") from None
    addresses: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        address = Address(family, str(sockaddr[0]))
        if family in (socket.AF_INET, socket.AF_INET6) and address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve host {host!r}: no IPv4 or IPv6 "
                                           "address")
    return addresses


def check_port_free(addresses: list[Address], port: int) -> None:
    """Raises the address-in-use OSError when another server listens on one of the addresses
    at port, even one whose SO_REUSEPORT listeners this user could join (and silently take
    part of its clients).

    The probe binds a socket with SO_REUSEADDR, as kqfast's listeners have, and without
    SO_REUSEPORT.  On Linux that bind fails while any socket listens on an overlapping
    address and port; on FreeBSD and macOS, while any socket is bound to exactly that address
    and port.  Either way it fails exactly where a plain, single-listener kqfast-echo would,
    and connections left in TIME_WAIT by an earlier server do not count.  (A connection
    attempt instead would be a client of the other server, and a full backlog or a filtered
    port would pass for a free one.)  Port 0 needs no probe: the kernel picks one no socket
    uses."""
    if port != 0:
        for address in addresses:
            bound_socket(address, port, share=False).close()


def bound_socket(address: Address, port: int, share: bool) -> socket.socket:
    """A socket bound, not listening, to address and port with the options of kqfast's
    listeners: SO_REUSEADDR (connections in TIME_WAIT do not block the port), IPV6_V6ONLY,
    and the port-sharing option when share."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, _SHARE_PORT, 1)
        sock.bind((address.host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address_text(address.host, port)}: "
                                 f"{exc.strerror}") from None
    return sock


def bind_each(addresses: list[Address], port: int,
              bind: Callable[[Address, int], socket.socket]) -> list[socket.socket]:
    """bind(address, port) for every address; with port 0 the first picks a free port and the
    others take the same.  An address this machine does not have (ADDRESS_UNAVAILABLE) is
    left out when there are others, as long as one is bound."""
    socks: list[socket.socket] = []
    unavailable: OSError | None = None
    try:
        for address in addresses:
            try:
                sock = bind(address, port)
            except OSError as exc:
                if exc.errno not in ADDRESS_UNAVAILABLE or len(addresses) == 1:
                    raise
                unavailable = exc
                continue
            socks.append(sock)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        assert unavailable is not None
        raise unavailable
    return socks
