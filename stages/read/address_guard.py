"""Refusing to fetch from link-local and cloud instance-metadata addresses.

URL lists come from strangers, and a build on a cloud VM would otherwise fetch whatever a
list names: `http://169.254.169.254/latest/meta-data/iam/...` hands out the machine's
credentials. The check runs where the socket is made (urllib3's `_new_conn`), so it holds
for every connection requests opens: the first one, each one after a redirect, and each
retry. It looks at the host name, at every address the name resolves to, and at the
address the socket actually connected to (a name that resolves to something else the
second time cannot slip through). Each request's own host is checked too before it is
sent, so a request through a proxy (whose socket reaches the proxy) is judged as well. Loopback and private ranges stay allowed: local tests
and local servers work. `allow` (`--allow-address CIDR`) opens a blocked range.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

#: link-local (where AWS, GCP, Azure and OpenStack serve instance metadata), AWS's IPv6
#: metadata address, and Alibaba Cloud's metadata address
BLOCKED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"))
#: names of metadata services (GCP); refused whatever they resolve to, unless allowed
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog"})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(OSError):
    """A connection the guard refused; `host` and `address` say to what."""

    def __init__(self, host: str, address: str, why: str):
        super().__init__(f"{host} ({address}) is {why}: not fetched; --allow-address opens a range")
        self.host, self.address = host, address


def parse_networks(entries) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`entries` (CIDR strings, or single addresses) as networks; ValueError names a bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address range (CIDR such as 169.254.169.254/32): {entry!r}") from None
    return tuple(networks)


def _plain(address: Address) -> Address:
    """An IPv4 address written as IPv6 (::ffff:a.b.c.d) is judged as the IPv4 one."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


@dataclass(frozen=True)
class AddressGuard:
    allow: tuple = ()  # networks opened by --allow-address

    def _allowed(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.allow)

    def reason(self, host: str, address: str) -> str | None:
        """Why connecting to `address` (resolved from `host`) is refused, or None."""
        ip = _plain(ipaddress.ip_address(address.split("%", 1)[0]))  # drop an IPv6 zone (fe80::1%eth0)
        if self._allowed(ip):
            return None
        if host.lower().rstrip(".") in METADATA_NAMES:
            return "a cloud metadata service"
        for network in BLOCKED_NETWORKS:
            if ip.version == network.version and ip in network:
                return f"in {network} (link-local or cloud metadata)"
        return None

    def check_host(self, host: str, port: int | None) -> None:
        """Before connecting: refuse if the name, or any address it resolves to, is blocked."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return  # the connection attempt reports the resolution failure as it always has
        for info in infos:
            address = info[4][0]
            why = self.reason(host, address)
            if why:
                raise BlockedAddress(host, address, why)

    def check_peer(self, host: str, sock: socket.socket) -> None:
        """After connecting: refuse the address the socket actually reached."""
        address = sock.getpeername()[0]
        why = self.reason(host, address)
        if why:
            raise BlockedAddress(host, address, why)


def guarded_adapter(guard: AddressGuard):
    """A requests HTTPAdapter whose every connection (http and https) passes `guard`."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def guarded(connection_class):
        class Guarded(connection_class):
            def _new_conn(self):
                guard.check_host(self._dns_host, self.port)
                sock = super()._new_conn()
                try:
                    guard.check_peer(self._dns_host, sock)
                except BlockedAddress:
                    sock.close()
                    raise
                return sock

        return Guarded

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = guarded(HTTPConnection)

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = guarded(HTTPSConnection)

    class GuardedAdapter(HTTPAdapter):
        def send(self, request, *args, **kwargs):
            target = urllib.parse.urlsplit(request.url)
            guard.check_host(target.hostname or "", target.port)
            return super().send(request, *args, **kwargs)

        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

    return GuardedAdapter()


def blocked_in(exc: BaseException) -> BlockedAddress | None:
    """The BlockedAddress inside the wrappers requests and urllib3 put around it, if any."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BlockedAddress):
            return current
        todo.extend(x for x in (current.__cause__, current.__context__, getattr(current, "reason", None),
                                *getattr(current, "args", ())) if isinstance(x, BaseException))
    return None
