"""Every message of both protocols, with its wire kind id.

Compatibility regime
--------------------
- Kind ids are never reused or renumbered. A message's fields are never reordered or
  retyped; a new field may only be appended, with a default, and an older peer ignores it.
- Kinds 1-99 are shared by both protocols (replies, files, env, DNS): the daemon forwards
  these between a layer and its agent channel unchanged but for the request id.
- Kinds 100-199 exist only in the agent protocol (daemon <-> agent), which only grows: a new
  kind is sent only to a peer whose negotiated version or announced features include it.
- Kinds 200-299 exist only in the layer protocol (layer <-> daemon), which ships with both
  ends and need not be backwards compatible (the handshake checks the build id).

Wire shapes used inside fields (arrays, so the C layer can read them by position):
- stat: [dev, ino, mode, nlink, uid, gid, rdev, size, blksize, blocks,
         atime_ns, mtime_ns, ctime_ns]
- statfs: [type, bsize, blocks, bfree, bavail, files, ffree, namelen, frsize, flags]
- dir entry: [name, ino, d_type]
- address info: [family, socktype, protocol, address, port]
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from mirrord.protocol._base import Message, message

# Agent features announced in Hello/Welcome: a Connect with protocol "unix" is sent only to an
# agent that announced this one.
FEATURE_UNIX_STREAMS = "unix_streams"
# An agent that announced this one terminates TLS under a filtered steal (`Subscribe.tls`); an
# older agent ignores the field and passes TLS through untouched.
FEATURE_INCOMING_TLS = "incoming_tls"
# An agent announces this one only on a stream that can pass fds (a unix socket: the agent, the
# daemon and so the layer are on one machine, a local target). The daemon then may ask for
# `Connect.handover` and reads fds with the stream's bytes; a layer's `FileFetch.handover_flags`
# is answered by `FileHanded` only on such a stream.
FEATURE_HANDOVER = "handover"

__all__ = [
    "CONN_CLOSE_NORMAL",
    "FEATURE_HANDOVER",
    "FEATURE_INCOMING_TLS",
    "FEATURE_UNIX_STREAMS",
    "INCOMING_MODES",
    "MAX_DATA_CHUNK",
    "MAX_DIR_BATCH",
    "STATFS_FIELDS",
    "STAT_FIELDS",
    "ChannelClose",
    "ChannelOpen",
    "Chown",
    "ConnClose",
    "Connect",
    "Connected",
    "Credit",
    "Data",
    "DirClose",
    "DirEntries",
    "DirOpen",
    "DirOpened",
    "DirRead",
    "DnsLookup",
    "DnsReply",
    "EnvReply",
    "EnvRequest",
    "ErrorReply",
    "Fatal",
    "Fchmod",
    "FileAccess",
    "FileClose",
    "FileData",
    "FileFetch",
    "FileFetched",
    "FileHanded",
    "FileOpen",
    "FileOpened",
    "FilePosition",
    "FileRead",
    "FileSeek",
    "FileStat",
    "FileWrite",
    "FileWritten",
    "Fsync",
    "Ftruncate",
    "Hello",
    "HostnameReply",
    "HostnameRequest",
    "IncomingConnection",
    "LayerConnect",
    "LayerConnected",
    "LayerDisconnect",
    "LayerHello",
    "LayerListen",
    "LayerUnlisten",
    "LayerWelcome",
    "Link",
    "Mkdir",
    "Ok",
    "PeerLookup",
    "PeerReply",
    "Ping",
    "Pong",
    "ReadLink",
    "ReadLinkReply",
    "Rename",
    "Rmdir",
    "Shutdown",
    "StatFs",
    "StatFsReply",
    "StatReply",
    "Subscribe",
    "Subscribed",
    "Symlink",
    "TrafficStats",
    "Unlink",
    "Unsubscribe",
    "Utimens",
    "Welcome",
    "passes_fd",
]

MAX_DATA_CHUNK = 1024 * 1024  # largest Data / FileRead payload in one message
MAX_DIR_BATCH = 4096  # most directory entries in one DirEntries
CONN_CLOSE_NORMAL = 0
INCOMING_MODES = ("mirror", "steal")
STAT_FIELDS = [
    "dev",
    "ino",
    "mode",
    "nlink",
    "uid",
    "gid",
    "rdev",
    "size",
    "blksize",
    "blocks",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
]
STATFS_FIELDS = [
    "type",
    "bsize",
    "blocks",
    "bfree",
    "bavail",
    "files",
    "ffree",
    "namelen",
    "frsize",
    "flags",
]


def _port(value: int, name: str) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{name} {value} is not a port (0-65535)")


def _nonneg(value: int, name: str) -> None:
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")


class Request(Message):
    """A message that expects exactly one reply echoing its `request_id`."""

    __slots__ = ()
    request_id: int


class Reply(Message):
    """The answer to a `Request`, echoing its `request_id`."""

    __slots__ = ()
    request_id: int


# ---------------------------------------------------------------- shared: replies, control


@message(1)
class ErrorReply(Reply):
    """A request failed; `errno` is what libc would have set in the layer."""

    request_id: int
    errno: int
    message: str = ""


@message(2)
class Ok(Reply):
    request_id: int


@message(3)
class Fatal(Message):
    """The sender is closing the connection (or, in the agent protocol, a channel) because of
    `code`; `message` says why and what to check."""

    code: str
    message: str


@message(4)
class Ping(Message):
    nonce: int


@message(5)
class Pong(Message):
    nonce: int


# ---------------------------------------------------------------- shared: files


@message(10)
class FileOpen(Request):
    request_id: int
    path: bytes
    flags: int
    mode: int = 0


@message(11)
class FileOpened(Reply):
    request_id: int
    handle: int


@message(12)
class FileRead(Request):
    """Read up to `size` bytes at `offset`, or at the handle's position when `offset` is null."""

    request_id: int
    handle: int
    size: int
    offset: int | None = None

    def _validate(self) -> None:
        if not 0 <= self.size <= MAX_DATA_CHUNK:
            raise ValueError(f"size {self.size} outside 0..{MAX_DATA_CHUNK}")
        if self.offset is not None:
            _nonneg(self.offset, "offset")


@message(13)
class FileData(Reply):
    request_id: int
    data: bytes


@message(14)
class FileWrite(Request):
    request_id: int
    handle: int
    data: bytes
    offset: int | None = None

    def _validate(self) -> None:
        if len(self.data) > MAX_DATA_CHUNK:
            raise ValueError(f"{len(self.data)} bytes exceed {MAX_DATA_CHUNK}")
        if self.offset is not None:
            _nonneg(self.offset, "offset")


@message(15)
class FileWritten(Reply):
    request_id: int
    count: int


@message(16)
class FileSeek(Request):
    request_id: int
    handle: int
    offset: int
    whence: int


@message(17)
class FilePosition(Reply):
    request_id: int
    position: int


@message(18)
class FileClose(Request):
    request_id: int
    handle: int


@message(19)
class FileStat(Request):
    """stat (`path`, follow), lstat (`path`, not follow) or fstat (`handle`)."""

    request_id: int
    path: bytes | None = None
    handle: int | None = None
    follow: bool = True

    def _validate(self) -> None:
        if (self.path is None) == (self.handle is None):
            raise ValueError("exactly one of path and handle")


@message(20)
class StatReply(Reply):
    request_id: int
    stat: list[int]

    def _validate(self) -> None:
        if len(self.stat) != len(STAT_FIELDS):
            raise ValueError(f"stat has {len(self.stat)} fields, not {len(STAT_FIELDS)}")


@message(21)
class StatFs(Request):
    request_id: int
    path: bytes | None = None
    handle: int | None = None

    def _validate(self) -> None:
        if (self.path is None) == (self.handle is None):
            raise ValueError("exactly one of path and handle")


@message(22)
class StatFsReply(Reply):
    request_id: int
    statfs: list[int]

    def _validate(self) -> None:
        if len(self.statfs) != len(STATFS_FIELDS):
            raise ValueError(f"statfs has {len(self.statfs)} fields, not {len(STATFS_FIELDS)}")


@message(23)
class FileAccess(Request):
    request_id: int
    path: bytes
    mode: int


@message(24)
class ReadLink(Request):
    request_id: int
    path: bytes


@message(25)
class ReadLinkReply(Reply):
    request_id: int
    target: bytes


@message(26)
class DirOpen(Request):
    """opendir (`path`) or fdopendir (`handle` of an open file)."""

    request_id: int
    path: bytes | None = None
    handle: int | None = None

    def _validate(self) -> None:
        if (self.path is None) == (self.handle is None):
            raise ValueError("exactly one of path and handle")


@message(27)
class DirOpened(Reply):
    request_id: int
    handle: int


@message(28)
class DirRead(Request):
    request_id: int
    handle: int
    max_entries: int = 256

    def _validate(self) -> None:
        if not 1 <= self.max_entries <= MAX_DIR_BATCH:
            raise ValueError(f"max_entries {self.max_entries} outside 1..{MAX_DIR_BATCH}")


@message(29)
class DirEntries(Reply):
    """A batch of entries; an empty batch means the end of the directory."""

    request_id: int
    entries: list[tuple[bytes, int, int]]


@message(30)
class DirClose(Request):
    request_id: int
    handle: int


@message(31)
class Mkdir(Request):
    request_id: int
    path: bytes
    mode: int = 0o777


@message(32)
class Rmdir(Request):
    request_id: int
    path: bytes


@message(33)
class Unlink(Request):
    request_id: int
    path: bytes


@message(34)
class Rename(Request):
    request_id: int
    old: bytes
    new: bytes


@message(35)
class Ftruncate(Request):
    request_id: int
    handle: int
    length: int

    def _validate(self) -> None:
        _nonneg(self.length, "length")


@message(36)
class Fchmod(Request):
    request_id: int
    handle: int
    mode: int


@message(37)
class Fsync(Request):
    request_id: int
    handle: int


@message(40)
class Utimens(Request):
    """utimensat (`path`, `follow`) or futimens (`handle`). A time is nanoseconds since the
    epoch; None leaves it as it is (UTIME_OMIT). The layer turns UTIME_NOW into its clock."""

    request_id: int
    path: bytes | None = None
    handle: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    follow: bool = True

    def _validate(self) -> None:
        if (self.path is None) == (self.handle is None):
            raise ValueError("exactly one of path and handle")


@message(41)
class Chown(Request):
    """chown/lchown (`path`, `follow`) or fchown (`handle`); -1 leaves the id as it is."""

    request_id: int
    path: bytes | None = None
    handle: int | None = None
    uid: int = -1
    gid: int = -1
    follow: bool = True

    def _validate(self) -> None:
        if (self.path is None) == (self.handle is None):
            raise ValueError("exactly one of path and handle")


@message(42)
class Symlink(Request):
    """symlink(target, path): `target` is the link's text, stored as given."""

    request_id: int
    target: bytes
    path: bytes


@message(43)
class Link(Request):
    """link(old, new); `follow` (AT_SYMLINK_FOLLOW) links what a symlink `old` points to."""

    request_id: int
    old: bytes
    new: bytes
    follow: bool = False


# ---------------------------------------------------------------- shared: env, DNS


@message(38)
class FileFetch(Request):
    """Open `path` (as `FileOpen`) and stat it in one round trip. If it is a regular file of
    at most `max_size` bytes and the open allows reading (not `O_WRONLY`, not `O_PATH`), the
    reply carries its whole content; the handle is then closed if the open was read-only
    (`O_RDONLY`), else kept (a write-back cache needs the content and the handle).

    `handover_flags` (not None: the layer accepts the open file itself): the agent opens with
    these flags (the user app's own, as its `open()` got them) instead, and if that is a
    regular file and its stream to the daemon passes fds (`FEATURE_HANDOVER`), the reply is
    `FileHanded` with the fd passed along with it; else it is served as without them."""

    request_id: int
    path: bytes
    flags: int
    mode: int = 0
    max_size: int = MAX_DATA_CHUNK
    handover_flags: int | None = None

    def _validate(self) -> None:
        if not 0 <= self.max_size <= MAX_DATA_CHUNK:
            raise ValueError(f"max_size {self.max_size} is not within 0..{MAX_DATA_CHUNK}")


@message(39)
class FileFetched(Reply):
    """`stat` of the opened file; `data` its content (see `FileFetch`) or None; `handle` the
    open handle, or None when the agent closed it (read-only open, content included)."""

    request_id: int
    stat: list[int]
    handle: int | None = None
    data: bytes | None = None

    def _validate(self) -> None:
        if len(self.stat) != len(STAT_FIELDS):
            raise ValueError(f"stat has {len(self.stat)} fields, not {len(STAT_FIELDS)}")
        if self.data is not None and len(self.data) > MAX_DATA_CHUNK:
            raise ValueError(f"{len(self.data)} bytes exceed {MAX_DATA_CHUNK}")
        if self.handle is None and self.data is None:
            raise ValueError("neither handle nor data")


@message(44)
class FileHanded(Reply):
    """The answer to a `FileFetch` with `handover_flags`: the opened file itself went with
    this frame (SCM_RIGHTS); the agent keeps nothing of it. The kind alone says that an fd
    comes with the frame, so a forwarder need not decode the body to pass it on."""

    request_id: int


@message(50)
class EnvRequest(Request):
    """The target's environment, filtered by glob lists (empty include = everything)."""

    request_id: int
    include: list[str]
    exclude: list[str]


@message(51)
class EnvReply(Reply):
    request_id: int
    env: dict[str, str]

    def __repr__(self) -> str:  # values are secrets: never in logs
        return f"EnvReply(request_id={self.request_id}, env=<{len(self.env)} variables>)"


@message(52)
class DnsLookup(Request):
    """getaddrinfo(host, port, hints) in the target's context."""

    request_id: int
    host: str
    port: int = 0
    family: int = 0
    socktype: int = 0
    protocol: int = 0
    flags: int = 0


@message(53)
class DnsReply(Reply):
    request_id: int
    addresses: list[tuple[int, int, int, str, int]]
    canonname: str = ""


@message(54)
class HostnameRequest(Request):
    request_id: int


@message(55)
class HostnameReply(Reply):
    request_id: int
    hostname: str


# ---------------------------------------------------------------- agent protocol only


@message(100)
class Hello(Message):
    """daemon -> agent, first frame: the versions it speaks and the per-agent secret."""

    version: int
    min_version: int
    secret: str
    client: str = ""
    features: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Hello(version={self.version}, min_version={self.min_version}, secret=<hidden>, "
            f"client={self.client!r}, features={self.features!r})"
        )


@message(101)
class Welcome(Message):
    """agent -> daemon: the negotiated version, and what the agent is attached to."""

    version: int
    agent_version: str
    target: str
    features: list[str]


@message(102)
class ChannelOpen(Message):
    """daemon -> agent, sent on the new channel: one layer process. With `parent`, the agent
    gives the new channel a copy of the parent channel's open handles (fork)."""

    pid: int
    parent: int | None = None
    label: str = ""

    def _validate(self) -> None:
        if self.parent is not None and self.parent <= 0:
            raise ValueError(f"parent channel {self.parent} must be positive")


@message(103)
class ChannelClose(Message):
    """Either side: the channel is gone; the agent frees everything it held for it."""

    reason: str = ""


@message(110)
class Connect(Request):
    """daemon -> agent: open an outgoing connection from the target's network namespace.
    `conn_id` is chosen by the daemon (even numbers). `protocol` "unix": a unix stream socket
    at the path `address` in the target's file system (`port` 0), sent only to an agent that
    announced the `FEATURE_UNIX_STREAMS` feature.

    `handover` (only to an agent that announced `FEATURE_HANDOVER`, for "tcp" and "udp"): the
    agent passes the connected socket itself with `Connected(handed=True)` and relays
    nothing; `conn_id` is then free again at once."""

    request_id: int
    conn_id: int
    protocol: str
    address: str
    port: int
    handover: bool = False

    def _validate(self) -> None:
        if self.protocol not in ("tcp", "udp", "unix"):
            raise ValueError(f"protocol {self.protocol!r} is not tcp, udp or unix")
        _port(self.port, "port")


@message(111)
class Connected(Reply):
    """`handed`: the connected socket went with this frame (SCM_RIGHTS), see `Connect`."""

    request_id: int
    conn_id: int
    local_address: str
    local_port: int
    handed: bool = False


@message(112)
class Data(Message):
    """Bytes of a connection, counted against the receiver's credit window."""

    conn_id: int
    data: bytes

    def _validate(self) -> None:
        if len(self.data) > MAX_DATA_CHUNK:
            raise ValueError(f"{len(self.data)} bytes exceed {MAX_DATA_CHUNK}")


@message(113)
class Credit(Message):
    """The receiver consumed `amount` more bytes of `conn_id`: the sender may send that many."""

    conn_id: int
    amount: int

    def _validate(self) -> None:
        if self.amount <= 0:
            raise ValueError(f"credit amount must be positive, got {self.amount}")


@message(114)
class Shutdown(Message):
    """The sender will send no more data on `conn_id` (half-close)."""

    conn_id: int


@message(115)
class ConnClose(Message):
    """`conn_id` is gone: 0 for an orderly close, else the errno (ECONNRESET, ...)."""

    conn_id: int
    errno: int = CONN_CLOSE_NORMAL


@message(120)
class Subscribe(Request):
    """daemon -> agent: mirror or steal `port`; `http_filter` (steal only) is the config's
    filter object, in its JSON shape. `on_concurrent_steal` (the config's key): "abort"
    refuses an unfiltered steal of a port another session steals; "override" takes it over;
    any other value counts as "abort". `tls` (a filtered steal only; agents announcing
    `FEATURE_INCOMING_TLS`): `{"cert_pem", "key_pem", "delivery": {"protocol": "tls"|"tcp",
    "trust_roots_pem", "server_name", "server_cert_pem"}}`, the PEM text of the session's
    `tls_steal`/`tls_delivery` files: the agent terminates the TLS of the port's clients."""

    request_id: int
    port: int
    mode: str
    http_filter: dict[str, Any] | None = None
    on_concurrent_steal: str = "abort"
    tls: dict[str, Any] | None = None

    def _validate(self) -> None:
        _port(self.port, "port")
        if self.mode not in INCOMING_MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {INCOMING_MODES}")

    def __repr__(self) -> str:  # `tls` holds a private key: never in logs
        return (
            f"Subscribe(request_id={self.request_id}, port={self.port}, mode={self.mode!r}, "
            f"http_filter={self.http_filter!r}, on_concurrent_steal={self.on_concurrent_steal!r}, "
            f"tls={'<certificate and key>' if self.tls is not None else None})"
        )


@message(121)
class Subscribed(Reply):
    request_id: int
    port: int
    warnings: list[str]


@message(122)
class Unsubscribe(Request):
    request_id: int
    port: int


@message(123)
class IncomingConnection(Message):
    """agent -> daemon: a mirrored or stolen connection (or, with a filter, one HTTP request
    as a connection of its own). `conn_id` is chosen by the agent (odd numbers). `replies`
    (mirror): the agent reads the user app's answer on this connection, so the daemon relays
    it instead of discarding it (a mirrored HTTP/2 stream: the app's SETTINGS and
    WINDOW_UPDATEs move the copied request on; the answer goes no further than the agent)."""

    conn_id: int
    port: int
    remote_address: str
    remote_port: int
    local_address: str
    local_port: int
    mode: str
    replies: bool = False


@message(124)
class TrafficStats(Message):
    """agent -> daemon: counters of a subscribed port; `drops` are kernel drops (mirror)."""

    port: int
    packets: int
    drops: int


# ---------------------------------------------------------------- layer protocol only


@message(200)
class LayerHello(Message):
    """layer -> daemon, first frame of every layer connection. `parent_pid` is set by a
    forked child's first connection; another thread of a registered process sends its pid."""

    build_id: str
    session: str
    pid: int
    parent_pid: int | None = None
    exe: bytes = b""


@message(201)
class LayerWelcome(Message):
    process: int


@message(202)
class LayerConnect(Request):
    """Outgoing: connect to `address:port` from the target.

    `protocol` "unix": `address` is a unix stream socket's path in the target (`port` 0);
    the daemon passes the layer's end of a socketpair.
    Without `source_port` (a TCP or UDP `connect()`), the daemon passes the layer the user
    app's end of a private relay connection with the reply (SCM_RIGHTS on the layer
    connection): a loopback socket of `family` (AF_INET or AF_INET6; 0: by `address`) already
    connected to the daemon's end, which the layer puts in the place of the app's socket.
    With `source_port` (UDP `sendto()` on an unconnected socket bound to
    `source_address:source_port`, or the system-call supervisor's `connect()` of the user
    app's own UDP socket), the reply names a daemon relay endpoint that takes datagrams from
    that address only; for "tcp" (the supervisor's `connect()` of the app's own TCP socket,
    bound to `source_address:source_port` on the loopback), a listener that accepts the
    connection from that address only, once, and nothing is passed."""

    request_id: int
    protocol: str
    address: str
    port: int
    family: int = 0
    source_address: str = ""
    source_port: int = 0

    def _validate(self) -> None:
        if self.protocol not in ("tcp", "udp", "unix"):
            raise ValueError(f"protocol {self.protocol!r} is not tcp, udp or unix")
        _port(self.port, "port")
        if self.family not in (0, 2, 10):
            raise ValueError(f"family {self.family} is not AF_INET or AF_INET6")
        if self.source_port:
            _port(self.source_port, "source_port")
            if self.protocol == "unix":
                raise ValueError("a source endpoint is only for tcp and udp")


@message(203)
class LayerConnected(Reply):
    """`relay_address:relay_port`: the daemon's end of the relay (the peer of the passed
    socket, or the endpoint for `sendto`); it also names the relay in `LayerDisconnect`.
    `handed`: the passed socket is the agent's own, connected in the target's network
    namespace (a local target, hand-over on): no relay, `relay_address` empty."""

    request_id: int
    relay_address: str
    relay_port: int
    local_address: str
    local_port: int
    handed: bool = False


@message(204)
class LayerListen(Request):
    """The app listens on `port` (as requested) and is really bound to `bound_port` on the
    user's machine: the daemon subscribes and connects incoming traffic there."""

    request_id: int
    port: int
    bound_address: str
    bound_port: int

    def _validate(self) -> None:
        _port(self.port, "port")
        _port(self.bound_port, "bound_port")


@message(205)
class LayerUnlisten(Request):
    request_id: int
    port: int


@message(206)
class PeerLookup(Request):
    """Who is the real peer of the accepted connection whose daemon-side source port is
    `local_port`?"""

    request_id: int
    local_port: int


@message(207)
class PeerReply(Reply):
    request_id: int
    address: str
    port: int


@message(208)
class LayerDisconnect(Request):
    """The app closed a UDP socket relayed through the daemon's endpoint at `relay_port`:
    end that relay and its connection in the target (a UDP relay never sees an end of its
    own) once the datagrams the app sent before closing are forwarded. The reply is `Ok`,
    also for a relay that is already gone."""

    request_id: int
    relay_port: int

    def _validate(self) -> None:
        _port(self.relay_port, "relay_port")


SHARED_KINDS: list[type[Message]] = [
    cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Message) and 0 < getattr(cls, "KIND", 0) < 100
]
AGENT_KINDS: list[type[Message]] = [
    cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Message) and 100 <= getattr(cls, "KIND", 0) < 200
]
LAYER_KINDS: list[type[Message]] = [
    cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, Message) and 200 <= getattr(cls, "KIND", 0) < 300
]


def passes_fd(msg: Message) -> bool:
    """Whether one fd comes with `msg`'s frame (SCM_RIGHTS): a reader that takes fds off its
    stream pairs them with frames in order by this."""
    return isinstance(msg, FileHanded) or (isinstance(msg, Connected) and msg.handed)
