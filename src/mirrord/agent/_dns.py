"""Name resolution as the target sees it: getaddrinfo semantics over the target's files.

Owns: answering `DnsLookup` like glibc's getaddrinfo would inside the target: the target's
`/etc/hosts` first (read under its root), then DNS with the target's `/etc/resolv.conf`
(nameservers, search, ndots, timeout, attempts) through dnspython, whose sockets are created
by the calling thread, which is a `NetnsRunner` thread inside the target's network namespace.
Numeric hosts, `localhost`, family, socktype, protocol, port and the AI_* flags PASSIVE,
CANONNAME, NUMERICHOST, V4MAPPED and ALL behave like glibc's; AI_ADDRCONFIG is ignored.
Errors carry getaddrinfo's `EAI_*` codes (negative numbers, as in glibc), which the channel
sends as the `ErrorReply.errno`.
Does not own: threads (every function here is blocking and runs on a netns thread).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dns.nameserver
    import dns.resolver

from mirrord.agent._files import TargetRoot

__all__ = ["GaiError", "TargetResolver"]

AI_PASSIVE = 0x1
AI_CANONNAME = 0x2
AI_NUMERICHOST = 0x4
AI_V4MAPPED = 0x8
AI_ALL = 0x10

_MAX_FILE = 1024 * 1024
_MAX_LIFETIME = 30.0

Address = tuple[int, int, int, str, int]


class GaiError(Exception):
    """getaddrinfo failed with `code` (socket.EAI_*, negative)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ResolvConf:
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2


def parse_resolv_conf(text: str) -> ResolvConf:
    conf = ResolvConf()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        key, args = words[0], words[1:]
        if key == "nameserver" and args:
            try:
                ipaddress.ip_address(args[0].split("%", 1)[0])
            except ValueError:
                continue
            conf.nameservers.append(args[0].split("%", 1)[0])
        elif key in ("search", "domain"):
            conf.search = args
        elif key == "options":
            for opt in args:
                name, _, value = opt.partition(":")
                try:
                    if name == "ndots":
                        conf.ndots = min(int(value), 15)
                    elif name == "timeout":
                        conf.timeout = max(min(float(value), 30.0), 0.1)
                    elif name == "attempts":
                        conf.attempts = max(min(int(value), 5), 1)
                except ValueError:
                    continue
    if not conf.nameservers:
        conf.nameservers = ["127.0.0.1"]  # glibc's default when none is configured
    return conf


def parse_hosts(text: str) -> list[tuple[str, list[str]]]:
    """(address, names) per line of a hosts file, in file order."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            ipaddress.ip_address(words[0].split("%", 1)[0])
        except ValueError:
            continue
        out.append((words[0].split("%", 1)[0], words[1:]))
    return out


def _family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _mapped(address: str) -> str:
    return f"::ffff:{address}"


def _as_ipv4(address: str) -> str:
    """A hosts-file address as glibc reads it for an AF_INET lookup: `::1` is 127.0.0.1 and
    a v4-mapped address its IPv4 (so a name listed only as `::1` still resolves)."""
    if ":" not in address:
        return address
    ip = ipaddress.IPv6Address(address)
    if ip.is_loopback:
        return "127.0.0.1"
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else address


@functools.cache
def _connected_nameserver_class() -> type[dns.nameserver.Do53Nameserver]:
    """dnspython's UDP nameserver, asked over a *connected* UDP socket, as glibc does.

    dnspython sends from an unconnected socket, which never hears of the ICMP "port
    unreachable" a pod's nameserver host answers when nothing listens on port 53: each lookup
    then waits the resolver's whole timeout. A connected socket gets ECONNREFUSED at once; the
    resolver drops that nameserver and tries the next (EAI_AGAIN when none is left), as fast
    as glibc fails in the pod. Built on the first lookup (dnspython is imported lazily)."""
    import dns.inet
    import dns.message
    import dns.nameserver
    import dns.query

    class ConnectedDo53Nameserver(dns.nameserver.Do53Nameserver):
        def query(  # noqa: PLR0917 - dnspython's signature
            self,
            request: dns.message.QueryMessage,
            timeout: float,
            source: str | None,
            source_port: int,
            max_size: bool,
            one_rr_per_rrset: bool = False,
            ignore_trailing: bool = False,
        ) -> dns.message.Message:
            if max_size or source is not None or source_port:  # TCP, or a chosen source
                return super().query(
                    request,
                    timeout,
                    source,
                    source_port,
                    max_size,
                    one_rr_per_rrset,
                    ignore_trailing,
                )
            family = dns.inet.af_for_address(self.address)
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect((self.address, self.port))
                return dns.query.udp(
                    request,
                    self.address,
                    timeout=timeout,
                    port=self.port,
                    raise_on_truncation=True,
                    one_rr_per_rrset=one_rr_per_rrset,
                    ignore_trailing=ignore_trailing,
                    ignore_errors=True,
                    ignore_unexpected=True,
                    sock=sock,
                )

    return ConnectedDo53Nameserver


class TargetResolver:
    """getaddrinfo and gethostname for one target. Call only from a netns thread."""

    def __init__(self, root: TargetRoot) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"<TargetResolver pid={self.root.pid}>"

    def _read(self, path: bytes) -> str:
        try:
            fd = self.root.open(path, os.O_RDONLY)
        except OSError:
            return ""
        try:
            return os.read(fd, _MAX_FILE).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def hostname(self) -> str:
        """The target's hostname: this thread is in its UTS namespace."""
        return socket.gethostname()

    # -- getaddrinfo ---------------------------------------------------------------------------

    def getaddrinfo(  # noqa: PLR0917 - getaddrinfo's own arguments
        self, host: str, port: int, family: int, socktype: int, protocol: int, flags: int
    ) -> tuple[list[Address], str]:
        if family not in (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6):
            raise GaiError(socket.EAI_FAMILY, f"address family {family} not supported")
        kinds = self._socktypes(socktype, protocol)
        canon = host  # as given: glibc neither strips blanks nor a trailing dot for hosts
        if not host:
            addrs = ["0.0.0.0", "::"] if flags & AI_PASSIVE else ["127.0.0.1", "::1"]
        else:
            numeric = self._numeric(host)
            if numeric is not None:
                addrs = [numeric]
            elif flags & AI_NUMERICHOST:
                raise GaiError(socket.EAI_NONAME, f"{host} is not a numeric address")
            else:
                addrs, canon = self._by_name(host, family, flags)
        addrs = self._select(addrs, family, flags, host)
        result = [(_family_of(a), st, proto, a, port) for a in addrs for st, proto in kinds]
        return result, (canon if flags & AI_CANONNAME else "")

    @staticmethod
    def _socktypes(socktype: int, protocol: int) -> list[tuple[int, int]]:
        table: list[tuple[int, int]] = [
            (socket.SOCK_STREAM, socket.IPPROTO_TCP),
            (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
            (socket.SOCK_RAW, 0),
        ]
        if socktype == 0:
            if protocol:
                picked = [(st, p) for st, p in table if p == protocol]
                if not picked:
                    raise GaiError(socket.EAI_SERVICE, f"protocol {protocol} not supported")
                return picked
            return table
        for st, p in table:
            if st == socktype:
                return [(st, protocol or p)]
        raise GaiError(socket.EAI_SOCKTYPE, f"socket type {socktype} not supported")

    @staticmethod
    def _numeric(host: str) -> str | None:
        try:
            return str(ipaddress.ip_address(host.split("%", 1)[0]))
        except ValueError:
            pass
        try:
            # inet_aton forms such as "127.1" are numeric for glibc too.
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None

    @staticmethod
    def _select(addrs: list[str], family: int, flags: int, host: str) -> list[str]:
        v4 = [a for a in addrs if _family_of(a) == socket.AF_INET]
        v6 = [a for a in addrs if _family_of(a) == socket.AF_INET6]
        if family == socket.AF_INET:
            picked = v4
        elif family == socket.AF_INET6:
            if flags & AI_V4MAPPED and (not v6 or flags & AI_ALL):
                picked = v6 + [_mapped(a) for a in v4]
            else:
                picked = v6
        else:
            picked = [a for a in addrs]
        if not picked:
            raise GaiError(
                socket.EAI_ADDRFAMILY if addrs else socket.EAI_NONAME,
                f"{host or 'the host'} has no address of the requested family",
            )
        seen: set[str] = set()
        return [a for a in picked if not (a in seen or seen.add(a))]  # type: ignore[func-returns-value]

    def _by_name(self, host: str, family: int, flags: int) -> tuple[list[str], str]:
        name = host.lower()  # "name." is not "name" in a hosts file (glibc compares as is)
        wanted: set[int] = (
            {socket.AF_INET, socket.AF_INET6} if family == socket.AF_UNSPEC else {family}
        )
        if family == socket.AF_INET6 and flags & AI_V4MAPPED:
            wanted.add(socket.AF_INET)
        from_hosts: list[str] = []
        canon = host
        for address, names in parse_hosts(self._read(b"/etc/hosts")):
            if family == socket.AF_INET:
                address = _as_ipv4(address)
            if name in (n.lower() for n in names) and _family_of(address) in wanted:
                if not from_hosts:
                    canon = names[0]
                from_hosts.append(address)
        if from_hosts:
            return from_hosts, canon
        if name.rstrip(".") == "localhost" or name.rstrip(".").endswith(".localhost"):
            return ["127.0.0.1", "::1"], host
        return self._by_dns(host, wanted)

    def _resolver(self) -> dns.resolver.Resolver:
        # dnspython is imported on the first lookup (on a namespace thread): it is a good part
        # of the agent's start otherwise, and many sessions never resolve a name
        import dns.name
        import dns.resolver

        conf = parse_resolv_conf(self._read(b"/etc/resolv.conf"))
        resolver = dns.resolver.Resolver(configure=False)
        nameserver = _connected_nameserver_class()
        resolver.nameservers = [nameserver(address) for address in conf.nameservers]
        resolver.search = [dns.name.from_text(s) for s in conf.search]
        resolver.use_search_by_default = True
        resolver.ndots = conf.ndots
        resolver.timeout = conf.timeout
        resolver.lifetime = min(conf.timeout * conf.attempts * len(conf.nameservers), _MAX_LIFETIME)
        resolver.cache = None
        return resolver

    def _by_dns(self, host: str, wanted: set[int]) -> tuple[list[str], str]:
        import dns.exception
        import dns.resolver

        resolver = self._resolver()
        found: list[str] = []
        canon = host
        nxdomain = 0
        again: str | None = None
        queries = [(socket.AF_INET, "A"), (socket.AF_INET6, "AAAA")]
        for fam, rdtype in queries:
            if fam not in wanted:
                continue
            try:
                answer = resolver.resolve(host, rdtype, search=True)
            except dns.resolver.NXDOMAIN:
                nxdomain += 1
                continue
            except dns.resolver.NoAnswer:
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                # glibc asks for A and AAAA at once: no server that failed one answers the
                # other in time, so do not wait a second lifetime for it
                again = str(exc)
                break
            except dns.exception.DNSException as exc:
                raise GaiError(socket.EAI_FAIL, f"lookup of {host} failed: {exc}") from None
            found.extend(str(r.address) for r in answer)
            canon = answer.canonical_name.to_text(omit_final_dot=True)
        if found:
            return found, canon
        if again is not None and not nxdomain:
            raise GaiError(socket.EAI_AGAIN, f"lookup of {host} failed: {again}")
        if nxdomain:
            raise GaiError(socket.EAI_NONAME, f"{host}: name not known in the target")
        raise GaiError(socket.EAI_NODATA, f"{host} has no address of the requested family")
