"""This server's own addresses, for spotting an MX that points back at us.

Postfix knows them from ``inet_interfaces`` (where it listens) and
``proxy_interfaces`` (addresses in front of it: NAT, a load balancer). Here
they are the addresses ``serve`` is bound to, a wildcard listener
(``0.0.0.0``, ``::``) standing for every address of the machine's interfaces,
plus ``delivery.our_addresses``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from ..model import IPAddress

__all__ = ["interface_addresses", "listening_addresses"]

_SIOCGIFADDR = 0x8915  # Linux: an interface's (primary) IPv4 address


def _ipv4(name: str) -> IPAddress | None:
    try:
        import fcntl
    except ImportError:  # not a Unix
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on that interface
            return None
    return ipaddress.IPv4Address(packed[20:24])


def interface_addresses() -> frozenset[IPAddress]:
    """The machine's interface addresses, as far as they can be found
    (loopback always)."""
    found: set[IPAddress] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    with contextlib.suppress(OSError):
        for _, name in socket.if_nameindex():
            ip = _ipv4(name)
            if ip is not None:
                found.add(ip)
    with contextlib.suppress(OSError):
        # Linux: one line per IPv6 address, the address first, in hex
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0] if line.split() else ""
            with contextlib.suppress(ValueError):
                found.add(ipaddress.IPv6Address(int(raw, 16)))
    return frozenset(found)


def listening_addresses(bound: Iterable[tuple[str, int]]) -> frozenset[IPAddress]:
    """The addresses of ``(host, port)`` listeners; a wildcard stands for
    :func:`interface_addresses`."""
    out: set[IPAddress] = set()
    for host, _port in bound:
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            continue
        if ip.is_unspecified:
            out |= {a for a in interface_addresses() if a.version == ip.version or ip.version == 6}
        else:
            out.add(ip)
    return frozenset(out)
