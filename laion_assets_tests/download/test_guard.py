"""The address guard's verdicts, as a pure function (no traffic leaves the machine)."""

from __future__ import annotations

import pytest

from laion_assets.core.download.guard import forbidden_reason, parse_networks


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("fd00:ec2::254", "private"),  # AWS IPv6 metadata
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "private"),  # documentation range
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 form of 169.254.169.254
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_verdicts(address, reason):
    assert forbidden_reason(address) == reason


def test_allow_list_opens_exactly_its_networks():
    allow = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])
    assert forbidden_reason("127.0.0.1", allow) is None
    assert forbidden_reason("127.0.0.2", allow) == "loopback"
    assert forbidden_reason("10.9.9.9", allow) is None
    assert forbidden_reason("169.254.169.254", allow) == "link-local"
    with pytest.raises(ValueError):
        parse_networks(["not-a-network"])
