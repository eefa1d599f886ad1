"""Who owns the other end of a loopback TCP connection (the daemon's check that an incoming
connection reaches the user app's own listener).

Does not own frame I/O (`mirrord._frames`), relays or their sockets (`mirrord._relay`).
"""

from __future__ import annotations

import socket
import struct

__all__ = ["peer_uid"]


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one exact lookup of a TCP socket
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_TCP_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE


def _diag_address(family: int, host: str) -> bytes:
    packed = socket.inet_pton(family, host)
    return packed + bytes(16 - len(packed))


def peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of the connected loopback TCP socket `sock` (for the end
    a listener accepted, or will accept: the listener's owner), or None when the kernel cannot
    say (no sock_diag). One netlink request for that one socket, no dump of the table.

    Who answered a connection to a port on this machine is otherwise unknowable: a listener of
    the app that was closed behind the layer's back may have been replaced by another user's."""
    family = sock.family
    mine = sock.getsockname()
    theirs = sock.getpeername()
    # the other end: its source is our destination and the other way round
    sockid = (
        struct.pack(">HH", theirs[1], mine[1])
        + _diag_address(family, str(theirs[0]).split("%", 1)[0])
        + _diag_address(family, str(mine[0]).split("%", 1)[0])
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _TCP_ALL_STATES) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(2)
            nl.sendto(header + request, (0, 0))
            reply = nl.recv(65536)
    except OSError:
        return None
    if len(reply) < 16:
        return None
    _, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        return None  # no such socket (already gone) or no inet_diag in this kernel
    # inet_diag_msg: family, state, timer, retrans (4 B), sockid (48 B), expires, rqueue,
    # wqueue, uid, inode
    if len(reply) < 16 + 4 + 48 + 20:
        return None
    expires_at = 16 + 4 + 48
    _, _, _, uid, _ = struct.unpack_from("=IIIII", reply, expires_at)
    return int(uid)
