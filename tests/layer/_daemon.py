"""The daemon of the layer tests: speaks the layer protocol (mirrord.protocol's
LayerConnection) over a unix socket, records every message, and has every file, directory,
DNS and hostname request answered by a real agent (`mirrord-agent`, through the one agent
client of the tests) whose target is a real local pod: its root is a temporary directory (a
tmpfs) holding the files the test put there, its DNS server knows the names the test gave.

What stays here is what a daemon does itself: one agent channel per layer process (a forked
child's opened with its parent's, so it inherits the parent's handles), the layer's listens
and the peers of incoming connections, and the relay sockets for LayerConnect (passed as the
daemon passes them) whose far end is a local server of the test (`upstreams`) or a greeting
echo. The layer under test is the real library preloaded into real programs. Plain threads (one
per layer connection, bounded by socket timeouts) keep it independent of the test's event loop;
the agent client runs on its own event loop thread (an anyio blocking portal).

The pod and the agent start on the first program run (`start()`): what a test adds before is
part of the pod from its creation (also a file that covers a host path, e.g. under /tmp);
what it adds later is written into the pod's root directly (pod-only directories only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import socket
import socketserver
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from mirrord._frames import SEND_BUFFER, PassedFd
from mirrord.daemon import open_relay_pair
from mirrord.layer import build_id
from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import CLOSED, NEED_DATA, LayerConnection, LayerRole, Message, Received
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentError
from tests._agent_process import AgentProc, start_agent, stop_agent

__all__ = ["LayerDaemon"]

_IO_TIMEOUT = 20.0
HOSTNAME = "target-pod"
# Requests a daemon answers itself (LayerConnect too, with its relay); the rest go to the agent.
_DAEMON_REQUESTS = (m.LayerListen, m.LayerUnlisten, m.LayerDisconnect, m.PeerLookup)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False
    layer_daemon: LayerDaemon


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.layer_daemon.serve(self.request)


class PodFiles:
    """The pod's regular files by absolute path (`files[path]` is the content, `path in files`)."""

    def __init__(self, daemon: LayerDaemon) -> None:
        self._daemon = daemon

    def __getitem__(self, path: str) -> bytes:
        host = self._daemon.host_path(path)
        if not host.is_file():
            raise KeyError(path)
        return host.read_bytes()

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._daemon.host_path(path).is_file()


class PodDirs:
    """The pod's directories: `path in dirs`, `{paths} <= dirs`."""

    def __init__(self, daemon: LayerDaemon) -> None:
        self._daemon = daemon

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._daemon.host_path(path).is_dir()

    def __ge__(self, paths: Iterable[str]) -> bool:
        return all(path in self for path in paths)


class LayerDaemon:
    """Content of the target (`add_file`, `add_dir`, `add_symlink`, `dns`) is the pod's;
    `files` and `dirs` read it back. `upstreams` maps (address, port) asked for by LayerConnect
    to a real local (host, port) the relay connects to; without an entry the relay greets with
    `hello <address>:<port>` and echoes."""

    def __init__(self, path: Path, make_pod: Callable[[PodSpec], LocalPod]) -> None:
        self.path = path
        self._make_pod = make_pod
        self._spec = PodSpec(
            name="layer",
            files={},
            hostname=HOSTNAME,
            echo_port=None,
            http_port=None,
            dns_records={},
        )
        self.dns: dict[str, str] = {}  # name -> address, the pod's DNS server's (before start)
        self._modes: dict[str, int] = {}
        self._dirs: list[str] = []
        self.files = PodFiles(self)
        self.dirs = PodDirs(self)
        self.upstreams: dict[tuple[str, int], tuple[str, int]] = {}
        self.messages: list[tuple[int, Message]] = []
        self.processes: dict[int, int | None] = {}  # pid -> parent pid, in registration order
        self.hellos: list[m.LayerHello] = []
        self.listens: list[m.LayerListen] = []
        self.peers: dict[int, tuple[str, int]] = {}
        self.errors: list[str] = []  # exceptions in this daemon: a test bug or a bad frame
        self._channels: dict[int, int] = {}  # layer pid -> agent channel
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._register_lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._pod: LocalPod | None = None
        self._agent: AgentProc | None = None
        self._exit = contextlib.ExitStack()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._client: AgentClient | None = None
        self._server = _Server(str(path), _Handler)
        self._server.layer_daemon = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle

    def __enter__(self) -> LayerDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the pod and start its agent and our client (once; later calls return)."""
        with self._start_lock:
            if self._client is not None:
                return
            self._spec.dns_records = dict(self.dns)
            self._pod = pod = self._make_pod(self._spec)
            for path in self._dirs:
                self.host_path(path).mkdir(parents=True, exist_ok=True)
            for path, mode in self._modes.items():
                os.chmod(self.host_path(path), mode)
            self._agent = agent = start_agent(f"pid/{pod.pid}")
            self._exit.callback(stop_agent, agent)
            self._portal = self._exit.enter_context(
                anyio.from_thread.start_blocking_portal(backend="trio")
            )
            self._client = self._exit.enter_context(
                self._portal.wrap_async_context_manager(AgentClient.open(agent))
            )

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._exit.close()

    def agent_pid(self) -> int:
        assert self._agent is not None, "the agent starts with the first program run"
        return self._agent.pid

    def agent_log(self) -> str:
        return self._agent.log() if self._agent is not None else ""

    # -- content

    def host_path(self, path: str) -> Path:
        """Where the pod's `path` is seen from the host (the pod's root, through /proc)."""
        assert self._pod is not None, "the pod starts with the first program run"
        return Path(f"/proc/{self._pod.pid}/root") / path.lstrip("/")

    def _writable_now(self, path: str) -> Path:
        top = path.lstrip("/").split("/", 1)[0]
        shared = os.path.ismount(self.host_path(top)) and top != "etc"
        assert not shared, (
            f"{path} is in a host directory shared with the pod: add it before the run"
        )
        return self.host_path(path)

    def add_file(self, path: str, content: bytes, mode: int = 0o644) -> None:
        if self._pod is None:
            self._spec.files[path] = content
            self._modes[path] = mode
            return
        host = self._writable_now(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(content)
        os.chmod(host, mode)

    def add_dir(self, path: str) -> None:
        if self._pod is None:
            self._dirs.append(path)
        else:
            self._writable_now(path).mkdir(parents=True, exist_ok=True)

    def add_symlink(self, path: str, target: str) -> None:
        assert self._pod is None, "add symlinks before the first run"
        self._spec.symlinks[path] = target

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
        # as the daemon's writers have it: replies the layer has not read yet do not keep its
        # next requests from being read (a read-ahead stream's, test_file_buffers.py)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
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
                        self.start()  # (a program run without the runner)
                        self._register(msg)
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
                    if isinstance(reply, tuple):  # a local target's file, handed over
                        handed, fd = reply
                        frame = conn.send(handed)
                        sent = socket.send_fds(sock, [frame], [fd.fileno()])
                        fd.close()
                        if frame[sent:]:
                            sock.sendall(frame[sent:])
                    elif reply is not None:
                        sock.sendall(conn.send(reply))
                if event is CLOSED:
                    return
        except (BrokenPipeError, ConnectionResetError):
            return  # the layer closed a connection with replies unread (a read-ahead stream)
        except Exception as exc:  # a broken layer connection ends only this connection
            self.errors.append("".join(traceback.format_exception(exc)))
            return
        finally:
            sock.close()

    def _register(self, msg: m.LayerHello) -> None:
        """A layer process's first Hello opens its agent channel (a forked child's with its
        parent's handles, as the daemon does); an exec'd process says Hello again. Under
        `_register_lock` until the channel is open: another connection of the process (a
        thread's) says Hello too, and must not send a request on a channel not yet open."""
        with self._register_lock:
            with self._lock:
                self.messages.append((msg.pid, msg))
                self.hellos.append(msg)
                if msg.pid in self.processes:
                    return
                self.processes[msg.pid] = msg.parent_pid
                channel = self._channels[msg.pid] = len(self._channels) + 1
                parent = self._channels.get(msg.parent_pid or -1)
            assert self._portal is not None and self._client is not None
            open_channel = functools.partial(
                self._client.open_channel, channel, pid=msg.pid, parent=parent
            )
            self._portal.call(open_channel)

    def _forward(self, pid: int, msg: Message) -> Message | tuple[Message, PassedFd]:
        """The agent's answer to a layer request, on the process's channel, under the layer's
        request id (and the fd the agent handed over with it, to pass on)."""
        request_id: int = getattr(msg, "request_id", 0)
        if isinstance(msg, m.DnsLookup) and msg.host.startswith("slow"):
            time.sleep(1.0)  # a slow answer: shows whether threads wait for each other
        assert self._portal is not None and self._client is not None
        layer_msg: Any = msg
        try:
            reply, handed = self._portal.call(
                self._client.request_passing,
                self._channels[pid],
                lambda r: dataclasses.replace(layer_msg, request_id=r),
            )
        except AgentError as exc:
            reply, handed = exc.reply, None
        answer: Message = dataclasses.replace(reply, request_id=request_id)
        return answer if handed is None else (answer, handed)

    def _answer(self, pid: int, msg: Message) -> Message | tuple[Message, PassedFd] | None:
        """What the daemon answers itself."""
        rid: int = getattr(msg, "request_id", 0)
        if isinstance(msg, m.LayerListen):
            self.listens.append(msg)
            return m.Ok(request_id=rid)
        if isinstance(msg, (m.LayerUnlisten, m.LayerDisconnect)):
            return m.Ok(request_id=rid)
        if isinstance(msg, m.PeerLookup):
            peer = self.peers.get(msg.local_port)
            if peer is None:
                return m.ErrorReply(
                    request_id=rid, errno=errno.ENOENT, message=os.strerror(errno.ENOENT)
                )
            return m.PeerReply(request_id=rid, address=peer[0], port=peer[1])
        if hasattr(msg, "request_id"):
            return self._forward(pid, msg)
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
