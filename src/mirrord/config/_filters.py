"""Parsing of the small string languages inside the config: address filters and regexes.

Owns: `parse_address_filter` for `feature.network.outgoing.filter` and
`feature.network.dns.filter` entries (`[proto://][name|ip|cidr][:port]`), and `check_regex`
for the regex lists (fs patterns, HTTP filters, unix streams, skip lists).
Does not own: matching at run time (the layer and the agent do that, each in its own way).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Literal

__all__ = [
    "AddressFilter",
    "check_fs_pattern",
    "check_regex",
    "parse_address_filter",
    "python_regex",
]

# Hostnames as Kubernetes and DNS allow them (RFC 1123 labels, dots between, optional trailing
# dot); underscores are accepted because cluster-internal SRV-style names use them.
_NAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)

# Rust's regex crate (which mirrord configs are written for) spells named groups `(?<name>...)`;
# Python 3.11's `re` only knows `(?P<name>...)`. Lookbehinds `(?<=` / `(?<!` are left alone.
_RUST_NAMED_GROUP = re.compile(r"\(\?<(?![=!])")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AddressFilter:
    """One parsed filter entry.

    `protocol` is "tcp", "udp" or "any"; `kind` says what `address` holds: "any" (no address,
    only a port), "ip", "subnet" (`address` plus `prefix`) or "name" (a hostname, resolved by
    whoever applies the filter); `port` is None for any port.
    """

    protocol: Literal["tcp", "udp", "any"]
    kind: Literal["any", "ip", "subnet", "name"]
    address: str | None
    prefix: int | None
    port: int | None


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} in {entry!r} is not a number from 0 to 65535")
    return int(text)


def parse_address_filter(entry: str, *, allow_protocol: bool = True) -> AddressFilter:
    """Parse `[tcp://|udp://][name|ip|ip/prefix|[ipv6]][:port]`; raise ValueError saying why not.

    Examples: `":53"`, `"udp://1.1.1.0/24:1337"`, `"google.com"`, `"[::1]:80"`, `"fd00::/8"`.
    DNS filters take the same form without the protocol (`allow_protocol=False`).
    """
    rest = entry.strip()
    protocol: Literal["tcp", "udp", "any"] = "any"
    if "://" in rest:
        proto, _, rest = rest.partition("://")
        if not allow_protocol:
            raise ValueError(f"{entry!r}: a DNS filter takes no protocol (write {rest!r})")
        if proto.lower() == "tcp":
            protocol = "tcp"
        elif proto.lower() == "udp":
            protocol = "udp"
        else:
            raise ValueError(f"{entry!r}: protocol {proto!r} is not one of 'tcp', 'udp'")
    if not rest:
        raise ValueError(f"{entry!r} names neither an address nor a port")

    address: str
    port: int | None = None
    if rest.startswith("["):
        # Bracketed IPv6, so that a port can follow: [::1]:80 or [fd00::/8]:80
        close = rest.find("]")
        if close < 0:
            raise ValueError(f"{entry!r}: '[' without a closing ']'")
        address = rest[1:close]
        tail = rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"{entry!r}: expected ':PORT' after ']', got {tail!r}")
            port = _parse_port(tail[1:], entry)
    elif rest.count(":") > 1:
        address = rest  # bare IPv6 address or subnet, no port possible
    elif ":" in rest:
        address, _, port_text = rest.partition(":")
        port = _parse_port(port_text, entry)
    else:
        address = rest

    if not address:
        return AddressFilter(protocol=protocol, kind="any", address=None, prefix=None, port=port)
    if "/" in address:
        try:
            net = ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r}: {address!r} is not a subnet like 10.0.0.0/8") from None
        return AddressFilter(
            protocol=protocol,
            kind="subnet",
            address=str(net.network_address),
            prefix=net.prefixlen,
            port=port,
        )
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        return AddressFilter(protocol=protocol, kind="ip", address=str(ip), prefix=None, port=port)
    if ":" in address or not _NAME_RE.match(address):
        raise ValueError(
            f"{entry!r}: {address!r} is neither an IP address, a subnet nor a hostname"
        )
    return AddressFilter(protocol=protocol, kind="name", address=address, prefix=None, port=port)


def python_regex(pattern: str) -> str:
    """The pattern in Python `re` spelling (Rust-style `(?<name>` groups become `(?P<name>`)."""
    return _RUST_NAMED_GROUP.sub("(?P<", pattern)


def check_regex(pattern: str) -> str:
    """Return `pattern` unchanged if it compiles (case-insensitive, as mirrord matches these);
    raise ValueError with the compiler's reason otherwise."""
    try:
        re.compile(python_regex(pattern), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return pattern


def check_fs_pattern(pattern: str) -> str:
    """`check_regex`, and no `(?` group but a leading `(?i)`: the layer matches file patterns
    in C as POSIX extended regexes, case-insensitively (after turning `\\d \\w \\s` into
    classes), which have no lookaround, other inline flags or named groups. Better refused
    here, with the key path, than at session start."""
    check_regex(pattern)
    if "(?" in pattern.removeprefix("(?i)").replace("(?:", "("):
        raise ValueError(
            f"{pattern!r}: '(?...)' groups (lookaround, inline flags, named groups) are not "
            "supported in file patterns; they are matched as POSIX extended regexes "
            "(case-insensitively, so a leading '(?i)' is accepted)"
        )
    return pattern
