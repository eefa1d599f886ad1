"""What the layer's C side needs from the session config, and the env that loads the layer.

Owns: `LayerSettings` (the layer's view of the config), its compact encoding (the string in
`MIRRORD_LAYER_CONFIG` that `native/policy.c` parses: one `key=value` per line, repeated keys
for lists, unknown keys ignored; docs/layer.md), `LayerSettings.from_config`, and
`layer_env`. Does not own the config model (mirrord.config) or any run-time decision
(the C side decides per call, without a round trip).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from mirrord.layer._library import library_path

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = ["LayerSettings", "LayerSettingsTooLarge", "layer_env", "posix_regex"]

FsMode = Literal["local", "localwithoverrides", "read", "write"]
IncomingMode = Literal["mirror", "steal", "off"]
FilterMode = Literal["remote", "local"]

# Rust-regex shorthands that POSIX extended regexes (regcomp) spell differently.
_SHORTHANDS = {
    "d": "[0-9]",
    "D": "[^0-9]",
    "w": "[[:alnum:]_]",
    "W": "[^[:alnum:]_]",
    "s": "[[:space:]]",
    "S": "[^[:space:]]",
}


def posix_regex(pattern: str) -> str:
    """Translate a mirrord (Rust `regex`) file pattern into POSIX ERE for the C side's
    `regcomp`, which matches case-insensitively as mirrord does: the shorthands `\\d \\w \\s`
    and their negations (outside brackets) become classes, a leading `(?i)` is dropped (it is
    what the layer does anyway), and lazy quantifiers (`*? +? ?? {n,m}?`) become greedy ones
    (the layer only asks "does it match", where laziness makes no difference). Raises
    ValueError for what POSIX cannot express (other inline flags, lookaround), so the user
    learns it at start rather than by a silent mismatch."""
    if pattern.startswith("(?i)"):
        pattern = pattern[4:]
    if re.search(r"\(\?(?!:)", pattern):
        raise ValueError(f"{pattern!r}: inline flags and lookaround are not supported by the layer")
    out: list[str] = []
    i = 0
    in_bracket = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if not in_bracket and nxt in _SHORTHANDS:
                out.append(_SHORTHANDS[nxt])
            else:
                out.append(ch + nxt)
            i += 2
            continue
        if ch == "(" and not in_bracket and pattern.startswith("(?:", i):
            out.append("(")  # POSIX groups all capture; a yes/no match is the same
            i += 3
            continue
        if ch == "[" and not in_bracket:
            in_bracket = True
            out.append(ch)
            # a leading ']' (or '^]') is a literal inside the bracket
            if pattern[i + 1 : i + 2] == "^":
                out.append("^")
                i += 1
            if pattern[i + 1 : i + 2] == "]":
                out.append("]")
                i += 1
        elif ch == "]" and in_bracket:
            in_bracket = False
            out.append(ch)
        elif ch in "*+?}" and pattern[i + 1 : i + 2] == "?" and not in_bracket:
            out.append(ch)  # lazy: the same strings match, greedily
            i += 1
        else:
            out.append(ch)
        i += 1
    return "".join(out)


_NAMED_GROUP = re.compile(r"\(\?P?<([A-Za-z_][A-Za-z0-9_]*)>")
_REPLACEMENT_REF = re.compile(r"\$(\$|\{([^}]*)\}|([A-Za-z0-9_]+))")


def posix_mapping(pattern: str, replacement: str) -> tuple[str, str]:
    """A `feature.fs.mapping` entry for the C side: named groups (`(?<name>...)`,
    `(?P<name>...)`) become numbered ones (POSIX has no names) and the replacement's `$name`,
    `${name}`, `$N`, `${N}` become `${N}` (a name or number that is not a group becomes empty,
    as in Rust's `Regex::replace`; `$$` is a `$`). The pattern then goes through
    `posix_regex`."""
    names: dict[str, int] = {}
    groups: list[int] = []  # the POSIX number of each capturing group, in Rust's order
    out: list[str] = []
    opened = 0  # every POSIX group, "(?:" ones included (they capture in POSIX)
    i = 0
    in_bracket = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_bracket:
            in_bracket = ch != "]"
        elif ch == "[":
            in_bracket = True
        elif ch == "(":
            named = _NAMED_GROUP.match(pattern, i)
            if named is not None:
                opened += 1
                groups.append(opened)
                names[named.group(1)] = opened
                out.append("(")
                i = named.end()
                continue
            if pattern.startswith("(?:", i):
                opened += 1
            elif not pattern.startswith("(?", i):
                opened += 1
                groups.append(opened)
        out.append(ch)
        i += 1
    if opened > 9:
        raise ValueError(f"{pattern!r}: the layer supports at most 9 groups in a mapping")
    posix = posix_regex("".join(out))

    def ref(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$$"
        name = m.group(2) if m.group(2) is not None else m.group(3)
        if name.isdigit():
            k = int(name)
            if k == 0:
                return "${0}"
            return f"${{{groups[k - 1]}}}" if k <= len(groups) else ""
        return f"${{{names[name]}}}" if name in names else ""

    return posix, _REPLACEMENT_REF.sub(ref, replacement)


# What the layer can take, from native/policy.c's parser (policy_load) and from execve(2). A
# setting beyond them is refused when the session is created, never dropped in silence.
MAX_LINE = 4095  # policy_load's line buffer: `char line[4096]` (a longer line: layer inactive)
MAX_LIST = 128  # MAX_LIST: entries per list (regexes, filters, ports, skipped processes)
MAX_MAPPINGS = 16  # MAX_MAP: feature.fs.mapping entries
# Linux refuses execve(2) with E2BIG when one environment string (name, "=", value, NUL) is over
# MAX_ARG_STRLEN, 32 pages of 4 KiB.
MAX_ENV_STRING = 32 * 4096
ENV_NAME = "MIRRORD_LAYER_CONFIG"
_SETTING_NAMES = {
    "read_only": ("feature.fs.read_only", MAX_LIST),
    "read_write": ("feature.fs.read_write", MAX_LIST),
    "local": ("feature.fs.local", MAX_LIST),
    "not_found": ("feature.fs.not_found", MAX_LIST),
    "fs_map": ("feature.fs.mapping", MAX_MAPPINGS),
    "outgoing_filter": ("feature.network.outgoing.filter", MAX_LIST),
    "unix_stream": ("feature.network.outgoing.unix_streams", MAX_LIST),
    "dns_filter": ("feature.network.dns.filter", MAX_LIST),
    "port_mapping": ("feature.network.incoming.port_mapping", MAX_LIST),
    "listen_ports": ("feature.network.incoming.listen_ports", MAX_LIST),
    "ignore_ports": ("feature.network.incoming.ignore_ports", MAX_LIST),
    "skip_process": ("skip_processes", MAX_LIST),
}


class LayerSettingsTooLarge(ValueError):
    """The session's settings do not fit the layer (a line, a list or the whole encoding is
    over a limit of the C parser or of execve): the message names the setting and the limit;
    the user shortens that setting."""


def _check_fits(lines: list[str]) -> None:
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for line in lines:
        key = line.partition("=")[0]
        counts[key] = counts.get(key, 0) + 1
        size = len(line.encode())
        sizes[key] = sizes.get(key, 0) + size + 1
        if size > MAX_LINE:
            name = _SETTING_NAMES.get(key, (key, 0))[0]
            raise LayerSettingsTooLarge(
                f"an entry of {name} is {size} bytes once encoded for the layer; the layer "
                f"reads at most {MAX_LINE} bytes per entry (native/policy.c): shorten it"
            )
    for key, count in counts.items():
        name, limit = _SETTING_NAMES.get(key, (key, 0))
        if limit and count > limit:
            raise LayerSettingsTooLarge(
                f"{name} has {count} entries; the layer takes at most {limit} "
                "(native/policy.c): merge some of them (one regex can match many paths)"
            )
    total = len(ENV_NAME) + 2 + sum(sizes.values())
    if total > MAX_ENV_STRING:
        largest = max(sizes, key=lambda k: sizes[k])
        raise LayerSettingsTooLarge(
            f"the layer's settings take {total} bytes in the environment variable {ENV_NAME}; "
            f"Linux allows at most {MAX_ENV_STRING} bytes per environment string "
            f"(MAX_ARG_STRLEN, execve would fail with E2BIG): shorten the configuration's "
            f"lists, first {_SETTING_NAMES.get(largest, (largest, 0))[0]} "
            f"({sizes[largest]} bytes)"
        )


def _line_value(value: str, key: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"layer setting {key}: {value!r} must not contain a line break")
    return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerSettings:
    """The layer's settings. Regexes are POSIX extended (see `posix_regex`); filter entries are
    mirrord's `[tcp://|udp://][name|ip|cidr][:port]` strings."""

    fs_mode: FsMode = "read"
    read_only: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    local: tuple[str, ...] = ()
    not_found: tuple[str, ...] = ()
    # feature.fs.mapping: (pattern, replacement), the first matching one rewrites a path
    fs_mapping: tuple[tuple[str, str], ...] = ()
    outgoing_tcp: bool = True
    outgoing_udp: bool = True
    outgoing_filter_mode: FilterMode | None = None
    outgoing_filter: tuple[str, ...] = ()
    unix_streams: tuple[str, ...] = ()  # unix stream socket paths connected in the target
    ignore_localhost: bool = False  # outgoing connections to localhost stay local
    dns: bool = True
    dns_filter_mode: FilterMode | None = None
    dns_filter: tuple[str, ...] = ()
    incoming: IncomingMode = "mirror"
    port_mapping: tuple[tuple[int, int], ...] = ()  # (local port, remote port)
    listen_ports: tuple[tuple[int, int], ...] = ()  # (requested port, port really bound)
    ignore_ports: tuple[int, ...] = ()
    incoming_ignore_localhost: bool = False
    skip_processes: tuple[str, ...] = ()
    skip_build_tools: bool = True
    hostname: bool = True
    timeout_ms: int = 30000  # a daemon silent this long fails the call with EIO
    # remote files up to this size are fetched whole into a memfd (read-only opens) or used as a
    # write-back cache (writable opens); bigger ones are read and written through the handle
    fetch_limit: int = 8 * 1024 * 1024
    # feature.fs.readonly_file_buffer: the first read-ahead of a read-only handle-backed file
    # (it grows while reads are sequential); 0: no read-ahead, every read a request
    read_ahead: int = 128000
    # feature.fs.handover: a remote regular file may come as the agent's own open file (a
    # local target's agent only; elsewhere the agent serves it as usual)
    fs_handover: bool = True
    # feature.network.ipv6: off, the app cannot create IPv6 sockets (EAFNOSUPPORT)
    ipv6: bool = True
    # experimental.syscall_supervisor: not for the C side (MIRRORD_LAYER_SYSCALLS tells the CLI;
    # None: the CLI decides from the executable)
    syscall_supervisor: bool | None = None

    def encode(self) -> str:
        """The compact string the C side parses (MIRRORD_LAYER_CONFIG). Raises ValueError
        for what it cannot express, `LayerSettingsTooLarge` for what it cannot hold."""
        from mirrord.config import parse_address_filter

        lines = ["v=1", f"fs_mode={self.fs_mode}"]
        for key in ("read_only", "read_write", "local", "not_found"):
            for pattern in getattr(self, key):
                lines.append(f"{key}={_line_value(posix_regex(pattern), key)}")
        for pattern, replacement in self.fs_mapping:
            posix, repl = posix_mapping(pattern, replacement)
            if "\t" in posix or "\t" in repl:
                raise ValueError(f"fs mapping {pattern!r}: a tab cannot be encoded")
            lines.append(
                f"fs_map={_line_value(posix, 'fs_mapping')}\t{_line_value(repl, 'fs_mapping')}"
            )
        for pattern in self.unix_streams:
            lines.append(f"unix_stream={_line_value(posix_regex(pattern), 'unix_stream')}")
        lines.append(f"outgoing_tcp={int(self.outgoing_tcp)}")
        lines.append(f"outgoing_udp={int(self.outgoing_udp)}")
        if self.outgoing_filter_mode is not None:
            lines.append(f"outgoing_filter_mode={self.outgoing_filter_mode}")
            for entry in self.outgoing_filter:
                f = parse_address_filter(entry)
                lines.append(f"outgoing_filter={f.protocol} {_host(f)} {f.port or 0}")
        lines.append(f"ignore_localhost={int(self.ignore_localhost)}")
        lines.append(f"dns={int(self.dns)}")
        if self.dns_filter_mode is not None:
            lines.append(f"dns_filter_mode={self.dns_filter_mode}")
            for entry in self.dns_filter:
                f = parse_address_filter(entry, allow_protocol=False)
                lines.append(f"dns_filter={_host(f)} {f.port or 0}")
        lines.append(f"incoming={self.incoming}")
        for a, b in self.port_mapping:
            lines.append(f"port_mapping={int(a)} {int(b)}")
        for a, b in self.listen_ports:
            lines.append(f"listen_ports={int(a)} {int(b)}")
        for p in self.ignore_ports:
            lines.append(f"ignore_ports={int(p)}")
        lines.append(f"incoming_ignore_localhost={int(self.incoming_ignore_localhost)}")
        for name in self.skip_processes:
            lines.append(f"skip_process={_line_value(name, 'skip_processes')}")
        lines.append(f"skip_build_tools={int(self.skip_build_tools)}")
        lines.append(f"hostname={int(self.hostname)}")
        lines.append(f"timeout_ms={int(self.timeout_ms)}")
        lines.append(f"fetch_limit={int(self.fetch_limit)}")
        lines.append(f"read_ahead={int(self.read_ahead)}")
        lines.append(f"fs_handover={int(self.fs_handover)}")
        lines.append(f"ipv6={int(self.ipv6)}")
        _check_fits(lines)
        return "\n".join(lines) + "\n"

    @classmethod
    def from_config(cls, cfg: MirrordConfig | Mapping[str, Any]) -> LayerSettings:
        """From a `mirrord.config.MirrordConfig` (or its JSON dump)."""
        from mirrord.config import MirrordConfig

        if isinstance(cfg, Mapping):
            cfg = MirrordConfig.model_validate(dict(cfg))
        feature = cfg.feature
        fs = feature.fs
        net = feature.network
        out = net.outgoing
        out_mode: FilterMode | None = None
        out_list: tuple[str, ...] = ()
        if out.filter is not None:
            out_mode = "remote" if out.filter.remote is not None else "local"
            out_list = tuple(out.filter.remote or out.filter.local or ())
        dns = net.dns
        dns_mode: FilterMode | None = None
        dns_list: tuple[str, ...] = ()
        if dns.filter is not None:
            dns_mode = "remote" if dns.filter.remote is not None else "local"
            dns_list = tuple(dns.filter.remote or dns.filter.local or ())
        inc = net.incoming
        return cls(
            fs_mode=fs.mode,
            read_only=tuple(fs.read_only),
            read_write=tuple(fs.read_write),
            local=tuple(fs.local),
            not_found=tuple(fs.not_found),
            fs_mapping=tuple((str(k), str(v)) for k, v in fs.mapping.items()),
            fs_handover=fs.handover,
            read_ahead=fs.readonly_file_buffer,
            outgoing_tcp=out.tcp,
            outgoing_udp=out.udp,
            outgoing_filter_mode=out_mode,
            outgoing_filter=out_list,
            unix_streams=tuple(out.unix_streams),
            ignore_localhost=out.ignore_localhost,
            dns=dns.enabled,
            dns_filter_mode=dns_mode,
            dns_filter=dns_list,
            incoming=inc.mode,
            port_mapping=tuple((int(a), int(b)) for a, b in inc.port_mapping),
            listen_ports=tuple((int(a), int(b)) for a, b in inc.listen_ports),
            ignore_ports=tuple(int(p) for p in inc.ignore_ports),
            incoming_ignore_localhost=inc.ignore_localhost,
            skip_processes=tuple(cfg.skip_processes or ()),
            skip_build_tools=cfg.skip_build_tools,
            hostname=feature.hostname,
            ipv6=net.ipv6,
            syscall_supervisor=cfg.experimental.syscall_supervisor,
        )


def _host(f: Any) -> str:
    if f.kind == "any" or f.address is None:
        return "*"
    if f.kind == "subnet":
        return f"{f.address}/{f.prefix}"
    return str(f.address)


def layer_env(
    *,
    socket_path: str,
    session_id: str,
    settings: LayerSettings,
    debug: bool = False,
    existing_preload: str | None = None,
) -> dict[str, str]:
    """The variables to add to the user command so the layer loads with `settings`.
    `LD_PRELOAD` is appended to `existing_preload` (the user's own value) when given."""
    lib = str(library_path())
    preload = f"{existing_preload}:{lib}" if existing_preload else lib
    env = {
        "LD_PRELOAD": preload,
        "MIRRORD_LAYER_SOCKET": socket_path,
        "MIRRORD_SESSION": session_id,
        "MIRRORD_LAYER_CONFIG": settings.encode(),
        # libuv's io_uring file operations would bypass every file hook (node)
        "UV_USE_IO_URING": "0",
    }
    if debug:
        env["MIRRORD_LAYER_DEBUG"] = "1"
    if settings.syscall_supervisor is not None:
        # `mirrord run` starts the command under mirrord-supervisor, or never (docs/layer.md)
        env["MIRRORD_LAYER_SYSCALLS"] = "1" if settings.syscall_supervisor else "0"
    return env
