"""Who is on the other end: the client's IP address, for per-address limits.

Behind NGINX every request comes from NGINX's address; the client's is in
``X-Forwarded-For``, which anyone can also write. So the header is believed
only when the peer is a configured trusted proxy, and then only its
trusted tail is skipped: the address is the right-most entry that is not a
trusted proxy (entries further left were written by the client and prove
nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/8``, ``127.0.0.1``, ``::1`` ... ; raises ValueError."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip())


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_ip(peer: str, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The client's address: ``peer`` unless it is a trusted proxy, then the
    right-most untrusted ``X-Forwarded-For`` entry (the left-most if all are
    trusted)."""
    if not forwarded_for or not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer
