"""Which addresses the downloader may connect to: public unicast only, unless an allow-list says so.

Crawled URLs are attacker-controlled. Without this guard a page could make the downloader fetch cloud
metadata (169.254.169.254), services on the private network or on the machine itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings to networks; a bad one is an error, not silently ignored."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def forbidden_reason(address: str | IPAddress, allow: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why connecting to address is refused, or None when it is allowed.

    Public unicast addresses are allowed; everything else (loopback, private, link-local including
    cloud metadata endpoints, CGNAT, multicast, reserved, unspecified, documentation ranges) is refused
    unless it falls inside one of the allowed networks. IPv4 addresses embedded in IPv6 (mapped,
    NAT64) are judged as the IPv4 address they reach.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%")[0])
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            ip = embedded
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"  # 169.254.169.254 and fe80::/10: cloud metadata lives here
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "cgnat"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not-global"
    return None


def parse_nameserver(text: str) -> str:
    """IP[:PORT] (IPv6 as [IP]:PORT or bare) to c-ares's form; a ValueError names what is wrong."""
    value = text.strip()
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"name server {text!r}: expected [IPv6]:PORT")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"name server {text!r}: not an IP address (IP[:PORT])") from None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"name server {text!r}: bad port {port!r}")
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{shown}:{port}" if port else str(ip)
