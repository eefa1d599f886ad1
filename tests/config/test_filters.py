"""The outgoing/DNS address filter language and regex checks."""

from __future__ import annotations

import pytest

from mirrord.config import AddressFilter, check_regex, parse_address_filter, python_regex
from mirrord.config._filters import check_fs_pattern


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (":53", AddressFilter(protocol="any", kind="any", address=None, prefix=None, port=53)),
        (
            "udp://1.1.1.0/24:1337",
            AddressFilter(protocol="udp", kind="subnet", address="1.1.1.0", prefix=24, port=1337),
        ),
        (
            "tcp://localhost:1337",
            AddressFilter(protocol="tcp", kind="name", address="localhost", prefix=None, port=1337),
        ),
        (
            "google.com",
            AddressFilter(
                protocol="any", kind="name", address="google.com", prefix=None, port=None
            ),
        ),
        (
            "1.1.5.0/24",
            AddressFilter(protocol="any", kind="subnet", address="1.1.5.0", prefix=24, port=None),
        ),
        (
            "10.0.0.7:5432",
            AddressFilter(protocol="any", kind="ip", address="10.0.0.7", prefix=None, port=5432),
        ),
        (
            "[fd00::1]:80",
            AddressFilter(protocol="any", kind="ip", address="fd00::1", prefix=None, port=80),
        ),
        (
            "fd00::/8",
            AddressFilter(protocol="any", kind="subnet", address="fd00::", prefix=8, port=None),
        ),
        (
            "TCP://postgres.db.svc.cluster.local:5432",
            AddressFilter(
                protocol="tcp",
                kind="name",
                address="postgres.db.svc.cluster.local",
                prefix=None,
                port=5432,
            ),
        ),
        (
            "udp-logger",
            AddressFilter(
                protocol="any", kind="name", address="udp-logger", prefix=None, port=None
            ),
        ),
    ],
)
def test_parse_address_filter(entry: str, expected: AddressFilter) -> None:
    assert parse_address_filter(entry) == expected


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("", "neither an address nor a port"),
        ("tcp://", "neither an address nor a port"),
        ("x.com:http", "not a number"),
        (":65536", "not a number from 0 to 65535"),
        ("icmp://1.1.1.1", "protocol 'icmp'"),
        ("1.1.1.0/33", "not a subnet"),
        ("[::1", "without a closing"),
        ("[::1]80", "expected ':PORT'"),
        ("under score!", "neither an IP address"),
    ],
)
def test_parse_address_filter_errors(entry: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address_filter(entry)


def test_dns_filters_take_no_protocol() -> None:
    assert parse_address_filter("x.com:53", allow_protocol=False).port == 53
    with pytest.raises(ValueError, match="no protocol"):
        parse_address_filter("udp://x.com", allow_protocol=False)


def test_regexes() -> None:
    assert check_regex("^User-Agent: (?!kube-probe)") == "^User-Agent: (?!kube-probe)"
    assert python_regex(r"^/home/(?<user>\S+)/x(?<=x)") == r"^/home/(?P<user>\S+)/x(?<=x)"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        check_regex("(")


def test_file_patterns_accept_a_leading_case_insensitive_flag_only() -> None:
    # the layer matches file patterns case-insensitively, as mirrord does: (?i) adds nothing
    assert check_fs_pattern(r"(?i)^/app/.*\.json$") == r"(?i)^/app/.*\.json$"
    with pytest.raises(ValueError, match="not supported in file patterns"):
        check_fs_pattern(r"^/app/(?-i:X)")
    with pytest.raises(ValueError, match="not supported in file patterns"):
        check_fs_pattern(r"(?s)^/app")
