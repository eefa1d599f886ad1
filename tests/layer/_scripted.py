"""A scripted daemon for the layer tests: speaks the layer protocol (mirrord.protocol's
LayerConnection) over a unix socket and serves files, directories, DNS and the hostname from
dicts, records every message, and passes relay sockets for LayerConnect as the daemon does.

It is a test double of the daemon only: the layer under test is the real library preloaded
into real programs. Plain threads (one per layer connection, bounded by socket timeouts) keep
it independent of the event loop of the test.
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from mirrord.daemon import open_relay_pair
from mirrord.layer import build_id
from mirrord.protocol import CLOSED, NEED_DATA, LayerConnection, LayerRole, Message, Received
from mirrord.protocol import messages as m

__all__ = ["Handle", "ScriptedDaemon"]

_IO_TIMEOUT = 20.0


@dataclass
class Handle:
    path: str
    flags: int
    pos: int = 0
    is_dir: bool = False
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False
    scripted: ScriptedDaemon


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.scripted.serve(self.request)


class ScriptedDaemon:
    """`files` maps absolute paths to content; directories are implied by the paths (and
    `dirs`). `dns` maps names to addresses. `upstreams` maps (address, port) asked for by
    LayerConnect to a real local (host, port) the relay connects to; without an entry the
    relay greets with `hello <address>:<port>` and echoes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.dirs: set[str] = {"/"}
        self.symlinks: dict[str, str] = {}
        self.dns: dict[str, list[str]] = {}
        self.hostname = "target-pod"
        self.upstreams: dict[tuple[str, int], tuple[str, int]] = {}
        self.messages: list[tuple[int, Message]] = []
        self.processes: dict[int, int | None] = {}  # pid -> parent pid, in registration order
        self.hellos: list[m.LayerHello] = []
        self.listens: list[m.LayerListen] = []
        self.peers: dict[int, tuple[str, int]] = {}
        self.errors: list[str] = []  # exceptions in the scripted daemon: a test bug or a bad frame
        self._handles: dict[int, dict[int, Handle]] = {}
        self._next_handle = 1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._server = _Server(str(path), _Handler)
        self._server.scripted = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle

    def __enter__(self) -> ScriptedDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- content

    def add_file(self, path: str, content: bytes, mode: int = 0o644) -> None:
        self.files[path] = content
        self.modes[path] = mode
        parent = os.path.dirname(path)
        while parent not in self.dirs:
            self.dirs.add(parent)
            parent = os.path.dirname(parent)

    def requests(self, pid: int | None = None) -> list[Message]:
        """Every message but the handshake (optionally of one process)."""
        with self._lock:
            return [
                msg
                for p, msg in self.messages
                if not isinstance(msg, m.LayerHello) and (pid is None or p == pid)
            ]

    def kinds(self) -> list[str]:
        return [type(msg).__name__ for msg in self.requests()]

    # -- incoming

    def incoming(self, port: int, peer: tuple[str, int]) -> socket.socket:
        """Connect to the app's listener subscribed on `port`, as the daemon would for a
        mirrored or stolen connection from `peer`."""
        listen = next(sub for sub in reversed(self.listens) if sub.port == port)
        family = socket.AF_INET6 if ":" in listen.bound_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        self._sockets.append(sock)
        sock.settimeout(10)
        sock.bind((listen.bound_address, 0))
        self.peers[sock.getsockname()[1]] = peer  # before connecting: accept asks at once
        sock.connect((listen.bound_address, listen.bound_port))
        return sock

    # -- protocol

    def serve(self, sock: socket.socket) -> None:
        sock.settimeout(_IO_TIMEOUT)
        conn = LayerConnection(LayerRole.DAEMON, build_id=build_id())
        pid = 0
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except (TimeoutError, OSError):
                    return
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is CLOSED:
                        break
                    if not isinstance(event, Received):
                        continue
                    msg = event.message
                    if isinstance(msg, m.LayerHello):
                        pid = msg.pid
                        with self._lock:
                            self.messages.append((pid, msg))
                            self.hellos.append(msg)
                            if pid not in self.processes:
                                self.processes[pid] = msg.parent_pid
                                parent = self._handles.get(msg.parent_pid or -1, {})
                                self._handles[pid] = {
                                    h: Handle(**vars(v)) for h, v in parent.items()
                                }
                        sock.sendall(conn.welcome(process=pid))
                        continue
                    with self._lock:
                        self.messages.append((pid, msg))
                    if isinstance(msg, m.LayerConnect):
                        connected, passing = self._relay(msg.request_id, msg)
                        frame = conn.send(connected)
                        if passing is not None:  # the app's end, with the reply's first byte
                            sent = socket.send_fds(sock, [frame], [passing.fileno()])
                            passing.close()
                            frame = frame[sent:]
                        if frame:  # sendall(b"") still sends: EPIPE once the app is gone
                            sock.sendall(frame)
                        continue
                    reply = self._answer(pid, msg)
                    if reply is not None:
                        sock.sendall(conn.send(reply))
                if event is CLOSED:
                    return
        except Exception as exc:  # a broken layer connection ends only this connection
            import traceback

            self.errors.append("".join(traceback.format_exception(exc)))
            return
        finally:
            sock.close()

    def _new_handle(self, pid: int, h: Handle) -> int:
        with self._lock:
            num = self._next_handle
            self._next_handle += 1
            self._handles.setdefault(pid, {})[num] = h
        return num

    def _follow(self, path: str) -> str:
        for _ in range(8):  # bounded: a symlink loop ends as "not found"
            if path not in self.symlinks:
                return path
            path = self.symlinks[path]
        return path

    def _stat(self, path: str) -> list[int] | None:
        if path in self.files:
            mode = stat.S_IFREG | self.modes.get(path, 0o644)
            size = len(self.files[path])
        elif path in self.dirs:
            mode, size = stat.S_IFDIR | 0o755, 4096
        elif path in self.symlinks:
            mode, size = stat.S_IFLNK | 0o777, len(self.symlinks[path])
        else:
            return None
        ino = abs(hash(path)) % 1000000 + 1
        t = 1_700_000_000_000_000_000
        return [77, ino, mode, 1, 1000, 1000, 0, size, 4096, (size + 511) // 512, t, t, t]

    def _entries(self, path: str) -> list[tuple[bytes, int, int]]:
        prefix = path.rstrip("/") + "/"
        names: dict[str, int] = {}
        for f in self.files:
            if f.startswith(prefix) and "/" not in f[len(prefix) :]:
                names[f[len(prefix) :]] = 8  # DT_REG
        for d in self.dirs:
            if d.startswith(prefix) and d != prefix and "/" not in d[len(prefix) :]:
                names[d[len(prefix) :]] = 4  # DT_DIR
        for link in self.symlinks:
            if link.startswith(prefix) and "/" not in link[len(prefix) :]:
                names[link[len(prefix) :]] = 10  # DT_LNK
        return [(n.encode(), i + 100, t) for i, (n, t) in enumerate(sorted(names.items()))]

    def _answer(self, pid: int, msg: Message) -> Message | None:
        rid: int = getattr(msg, "request_id", 0)

        def err(code: int) -> m.ErrorReply:
            return m.ErrorReply(request_id=rid, errno=code, message=os.strerror(code))

        handles = self._handles.setdefault(pid, {})
        if isinstance(msg, m.FileOpen):
            path = self._follow(msg.path.decode())
            acc = msg.flags & os.O_ACCMODE
            if path in self.dirs:
                if acc != os.O_RDONLY:
                    return err(errno.EISDIR)
                return m.FileOpened(
                    request_id=rid,
                    handle=self._new_handle(pid, Handle(path, msg.flags, is_dir=True)),
                )
            if msg.flags & os.O_DIRECTORY:
                return err(errno.ENOTDIR if path in self.files else errno.ENOENT)
            if path not in self.files:
                if not msg.flags & os.O_CREAT:
                    return err(errno.ENOENT)
                if os.path.dirname(path) not in self.dirs:
                    return err(errno.ENOENT)
                self.add_file(path, b"", msg.mode & 0o777)
            elif msg.flags & os.O_CREAT and msg.flags & os.O_EXCL:
                return err(errno.EEXIST)
            if msg.flags & os.O_TRUNC and acc != os.O_RDONLY:
                self.files[path] = b""
            return m.FileOpened(
                request_id=rid, handle=self._new_handle(pid, Handle(path, msg.flags))
            )
        if isinstance(msg, m.FileFetch):
            # what the agent does: open, fstat, and the content of a small readable file
            opened = self._answer(
                pid, m.FileOpen(request_id=rid, path=msg.path, flags=msg.flags, mode=msg.mode)
            )
            if not isinstance(opened, m.FileOpened):
                return opened
            fetched = handles[opened.handle]
            stat = self._stat(fetched.path)
            if stat is None:
                handles.pop(opened.handle, None)
                return err(errno.ENOENT)
            acc = msg.flags & os.O_ACCMODE
            data = None
            if (
                not fetched.is_dir
                and stat[2] & 0o170000 == 0o100000
                and stat[7] <= msg.max_size
                and not msg.flags & os.O_PATH
                and acc != os.O_WRONLY
            ):
                data = self.files.get(fetched.path, b"")
            handle: int | None = opened.handle
            if data is not None and acc == os.O_RDONLY:
                handles.pop(opened.handle, None)
                handle = None
            return m.FileFetched(request_id=rid, stat=stat, handle=handle, data=data)
        if isinstance(msg, m.FileRead):
            h = handles.get(msg.handle)
            if h is None:
                return err(errno.EBADF)
            if h.is_dir:
                return err(errno.EISDIR)
            data = self.files.get(h.path, b"")
            start = h.pos if msg.offset is None else msg.offset
            chunk = data[start : start + msg.size]
            if msg.offset is None:
                h.pos += len(chunk)
            return m.FileData(request_id=rid, data=chunk)
        if isinstance(msg, m.FileWrite):
            h = handles.get(msg.handle)
            if h is None:
                return err(errno.EBADF)
            content = bytearray(self.files.get(h.path, b""))
            if msg.offset is not None:
                start = msg.offset
            elif h.flags & os.O_APPEND:
                start = len(content)
            else:
                start = h.pos
            if len(content) < start:
                content.extend(b"\0" * (start - len(content)))
            content[start : start + len(msg.data)] = msg.data
            self.files[h.path] = bytes(content)
            if msg.offset is None:
                h.pos = start + len(msg.data)
            return m.FileWritten(request_id=rid, count=len(msg.data))
        if isinstance(msg, m.FileSeek):
            h = handles.get(msg.handle)
            if h is None:
                return err(errno.EBADF)
            base = {0: 0, 1: h.pos, 2: len(self.files.get(h.path, b""))}.get(msg.whence)
            if base is None or base + msg.offset < 0:
                return err(errno.EINVAL)
            h.pos = base + msg.offset
            return m.FilePosition(request_id=rid, position=h.pos)
        if isinstance(msg, m.FileClose):
            return m.Ok(request_id=rid) if handles.pop(msg.handle, None) else err(errno.EBADF)
        if isinstance(msg, m.FileStat):
            if msg.handle is not None:
                h = handles.get(msg.handle)
                if h is None:
                    return err(errno.EBADF)
                path = h.path
            else:
                assert msg.path is not None
                path = msg.path.decode()
                if len(path) > 1 and path.endswith("/"):
                    path = path.rstrip("/")
                    if path in self.files:
                        return err(errno.ENOTDIR)
                if msg.follow:
                    path = self._follow(path)
            st = self._stat(path)
            return err(errno.ENOENT) if st is None else m.StatReply(request_id=rid, stat=st)
        if isinstance(msg, m.StatFs):
            return m.StatFsReply(
                request_id=rid, statfs=[0x01021994, 4096, 100, 50, 50, 1000, 900, 255, 4096, 0]
            )
        if isinstance(msg, m.FileAccess):
            path = self._follow(msg.path.decode())
            if self._stat(path) is None:
                return err(errno.ENOENT)
            mode = self.modes.get(path, 0o644)
            if msg.mode & os.W_OK and mode & 0o200 == 0:
                return err(errno.EACCES)
            if msg.mode & os.X_OK and path in self.files and mode & 0o111 == 0:
                return err(errno.EACCES)
            return m.Ok(request_id=rid)
        if isinstance(msg, m.ReadLink):
            path = msg.path.decode()
            if path in self.symlinks:
                return m.ReadLinkReply(request_id=rid, target=self.symlinks[path].encode())
            return err(errno.EINVAL if self._stat(path) else errno.ENOENT)
        if isinstance(msg, m.DirOpen):
            if msg.handle is not None:
                h = handles.get(msg.handle)
                if h is None:
                    return err(errno.EBADF)
                path = h.path
            else:
                assert msg.path is not None
                path = self._follow(msg.path.decode().rstrip("/") or "/")
            if path not in self.dirs:
                return err(errno.ENOTDIR if path in self.files else errno.ENOENT)
            entries = [(b".", 1, 4), (b"..", 2, 4), *self._entries(path)]
            return m.DirOpened(
                request_id=rid,
                handle=self._new_handle(pid, Handle(path, 0, is_dir=True, entries=entries)),
            )
        if isinstance(msg, m.DirRead):
            h = handles.get(msg.handle)
            if h is None:
                return err(errno.EBADF)
            batch, h.entries = h.entries[: msg.max_entries], h.entries[msg.max_entries :]
            return m.DirEntries(request_id=rid, entries=batch)
        if isinstance(msg, m.DirClose):
            return m.Ok(request_id=rid) if handles.pop(msg.handle, None) else err(errno.EBADF)
        if isinstance(msg, m.Mkdir):
            path = msg.path.decode()
            if self._stat(path) is not None:
                return err(errno.EEXIST)
            self.dirs.add(path)
            return m.Ok(request_id=rid)
        if isinstance(msg, m.Rmdir):
            path = msg.path.decode()
            if path not in self.dirs:
                return err(errno.ENOENT)
            if self._entries(path):
                return err(errno.ENOTEMPTY)
            self.dirs.discard(path)
            return m.Ok(request_id=rid)
        if isinstance(msg, m.Unlink):
            path = msg.path.decode()
            if path in self.dirs:
                return err(errno.EISDIR)
            if self.files.pop(path, None) is None:
                return err(errno.ENOENT)
            return m.Ok(request_id=rid)
        if isinstance(msg, m.Rename):
            old, new = msg.old.decode(), msg.new.decode()
            if old not in self.files:
                return err(errno.ENOENT)
            self.files[new] = self.files.pop(old)
            return m.Ok(request_id=rid)
        if isinstance(msg, m.Ftruncate):
            h = handles.get(msg.handle)
            if h is None:
                return err(errno.EBADF)
            data = self.files.get(h.path, b"")
            self.files[h.path] = data[: msg.length].ljust(msg.length, b"\0")
            return m.Ok(request_id=rid)
        if isinstance(msg, m.Fchmod):
            h = handles.get(msg.handle)
            if h is None:
                return err(errno.EBADF)
            self.modes[h.path] = msg.mode & 0o7777
            return m.Ok(request_id=rid)
        if isinstance(msg, m.Fsync):
            return m.Ok(request_id=rid) if msg.handle in handles else err(errno.EBADF)
        if isinstance(msg, m.DnsLookup):
            if msg.host.startswith("slow"):
                time.sleep(1.0)  # a slow answer: shows whether threads wait for each other
            addrs = self.dns.get(msg.host)
            if not addrs:
                return err(errno.ENOENT)
            out: list[tuple[int, int, int, str, int]] = []
            for a in addrs:
                fam = socket.AF_INET6 if ":" in a else socket.AF_INET
                if msg.family not in (0, fam):
                    continue
                out.append((fam, msg.socktype or 1, msg.protocol or 6, a, msg.port))
            return m.DnsReply(request_id=rid, addresses=out, canonname=msg.host)
        if isinstance(msg, m.HostnameRequest):
            return m.HostnameReply(request_id=rid, hostname=self.hostname)
        if isinstance(msg, m.LayerListen):
            self.listens.append(msg)
            return m.Ok(request_id=rid)
        if isinstance(msg, (m.LayerUnlisten, m.LayerDisconnect)):
            return m.Ok(request_id=rid)
        if isinstance(msg, m.PeerLookup):
            peer = self.peers.get(msg.local_port)
            if peer is None:
                return err(errno.ENOENT)
            return m.PeerReply(request_id=rid, address=peer[0], port=peer[1])
        if hasattr(msg, "request_id"):
            return err(errno.ENOSYS)
        return None

    # -- relays

    def _relay(self, rid: int, msg: m.LayerConnect) -> tuple[Message, socket.socket | None]:
        """The reply and the socket to pass with it, made as the daemon makes them."""
        if msg.source_port:  # sendto(): an endpoint for the app's own socket
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", 0))
            u.connect(("127.0.0.1", msg.source_port))
            passing = None
        else:
            family = socket.AF_INET6 if msg.family == 10 else socket.AF_INET
            kind = socket.SOCK_STREAM if msg.protocol == "tcp" else socket.SOCK_DGRAM
            u, passing = anyio.run(open_relay_pair, family, kind)
            u.setblocking(True)
        u.settimeout(_IO_TIMEOUT)
        self._sockets.append(u)
        if msg.protocol == "udp":
            threading.Thread(target=self._udp_echo, args=(u,), daemon=True).start()
        else:
            threading.Thread(target=self._tcp_relay, args=(u, msg), daemon=True).start()
        host, port = u.getsockname()[:2]
        reply = m.LayerConnected(
            request_id=rid,
            relay_address=host,
            relay_port=port,
            local_address="192.0.2.2",
            local_port=40000,
        )
        return reply, passing

    def _udp_echo(self, u: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                data, addr = u.recvfrom(65536)
                u.sendto(b"udp:" + data, addr)
        except OSError:
            pass

    def _tcp_relay(self, conn: socket.socket, msg: m.LayerConnect) -> None:
        upstream = self.upstreams.get((msg.address, msg.port))
        try:
            if upstream is None:
                conn.sendall(f"hello {msg.address}:{msg.port}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            up = socket.create_connection(upstream, timeout=_IO_TIMEOUT)
            self._sockets.append(up)
            t = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
            t.start()
            _pipe(conn, up)
            t.join(timeout=_IO_TIMEOUT)
        except OSError:
            pass
        finally:
            conn.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
