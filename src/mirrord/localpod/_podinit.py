"""The first process of a local pod: builds the pod's file system view, then serves.

Owns: what runs *inside* the pod's namespaces as its target process. It is started by
`mirrord.localpod._pod.create_pod` as `ip netns exec NS unshare --mount --uts
--propagation private PYTHON _podinit.py SPEC.json` so that its PID (seen from the host) is
the pod's target PID. It does not own the network namespace or the veth pair (the creator does).

Steps, in order (a failure prints a traceback to stderr, which the creator shows):
1. a tmpfs becomes the pod root; every top-level host directory is recursively bind-mounted
   into it (so interpreters, libraries and test files keep their paths), except `/etc`, which is
   a copy on the tmpfs so the pod's `hosts`, `resolv.conf`, `hostname` and files such as
   `/etc/shadow` are its own;
2. the pod's files and symlinks are written (top-level directories that the host lacks, such as
   `/app`, live on the tmpfs);
3. the process chroots into that root, sets the hostname in its own UTS namespace;
4. it starts the optional TCP echo and HTTP services on 0.0.0.0 (dual-stack on `::` when the
   spec says `ipv6`) and the optional DNS server
   on UDP 0.0.0.0:53 (authoritative for `dns_records`, NXDOMAIN for the rest), prints `ready`,
   and serves until killed.

This file runs as a script with only the standard library: it never imports mirrord.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from typing import Any

# Top-level host directories a pod does not get: machinery mounts, the boot partition.
_SKIPPED_TOP = frozenset({"mnt", "boot", "lost+found", "old_root", "etc", "media", "srv"})


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _build_root(root: str) -> None:
    _mount("-t", "tmpfs", "-o", "mode=0755", "mrdpodroot", root)
    for name in sorted(os.listdir("/")):
        path = os.path.join("/", name)
        dest = os.path.join(root, name)
        if name in _SKIPPED_TOP:
            continue
        if os.path.islink(path):
            os.symlink(os.readlink(path), dest)
        elif os.path.isdir(path):
            os.mkdir(dest)
            _mount("--rbind", path, dest)
        # plain files at / (e.g. .dockerenv) are not part of a pod
    os.mkdir(os.path.join(root, "etc"))
    subprocess.run(["cp", "-a", "/etc/.", os.path.join(root, "etc")], check=True)
    for name in ("mnt", "srv", "media"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    # The recursive bind of the directory holding our own root copied the root mount itself;
    # drop that copy so the pod's tree does not contain itself.
    nested = os.path.join(root, root.lstrip("/"))
    if os.path.ismount(nested):
        subprocess.run(["umount", "-l", nested], check=True)


def _write_files(root: str, workdir: str, files: dict[str, str], symlinks: dict[str, str]) -> None:
    for path, b64 in files.items():
        dest = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        data = base64.b64decode(b64)
        top = path.lstrip("/").split("/", 1)[0]
        bound = os.path.ismount(os.path.join(root, top)) and top != "etc"
        if bound:
            # A host directory bind-mounted into the pod: never write through to the host;
            # mount a private copy of the file over the existing path instead.
            if not os.path.exists(dest):
                raise SystemExit(
                    f"pod file {path}: {os.path.dirname(path)} is shared with the host and has "
                    "no such file to cover; put pod-only files under /app, /etc or another "
                    "top-level directory the host does not have"
                )
            staged = os.path.join(workdir, "files")
            os.makedirs(staged, exist_ok=True)
            src = os.path.join(staged, path.strip("/").replace("/", "_"))
            with open(src, "wb") as f:
                f.write(data)
            _mount("--bind", src, dest)
        else:
            with open(dest, "wb") as f:
                f.write(data)
    for path, target in symlinks.items():
        dest = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.lexists(dest):
            os.unlink(dest)
        os.symlink(target, dest)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512


class _HttpServer(http.server.ThreadingHTTPServer):
    # The default accept queue of 5 resets connections when tens of clients connect at once.
    request_queue_size = 512


class _Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    pod_name = "pod"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        out = f"{self.pod_name} {self.command} {self.path}\n".encode() + body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _dns_answer(query: bytes, records: dict[str, str]) -> bytes | None:
    """A minimal authoritative answer (A/AAAA from `records`, else NXDOMAIN) to one query."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack(">HHH", query[:6])
    if qdcount != 1:
        return None
    pos, labels = 12, []
    while pos < len(query) and query[pos]:
        n = query[pos]
        labels.append(query[pos + 1 : pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    pos += 1
    if pos + 4 > len(query):
        return None
    qtype, _qclass = struct.unpack(">HH", query[pos : pos + 4])
    question = query[12 : pos + 4]
    name = ".".join(labels).lower()
    answers = b""
    count = 0
    rcode = 3  # NXDOMAIN
    if name in records:
        rcode = 0
        address = records[name]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        if (qtype, family) in ((1, socket.AF_INET), (28, socket.AF_INET6)):
            rdata = socket.inet_pton(family, address)
            answers = struct.pack(">HHHIH", 0xC00C, qtype, 1, 5, len(rdata)) + rdata
            count = 1
    out_flags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080 | rcode
    return struct.pack(">HHHHHH", ident, out_flags, 1, count, 0, 0) + question + answers


def _serve_dns(sock: socket.socket, records: dict[str, str]) -> None:
    while True:
        query, peer = sock.recvfrom(4096)
        answer = _dns_answer(query, records)
        if answer is not None:
            sock.sendto(answer, peer)


def _dual_stack(cls: type[socketserver.TCPServer]) -> type[socketserver.TCPServer]:
    """`cls` listening on `::` for both families (IPv4 clients appear as ::ffff:a.b.c.d)."""

    class DualStack(cls):  # type: ignore[valid-type,misc]
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    return DualStack


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    root = spec["root"]
    _build_root(root)
    _write_files(root, spec["workdir"], spec["files"], spec["symlinks"])
    os.chroot(root)
    os.chdir(spec["cwd"])
    socket.sethostname(spec["hostname"])
    servers: list[socketserver.BaseServer] = []
    ipv6 = bool(spec.get("ipv6"))
    host = "::" if ipv6 else "0.0.0.0"
    if spec["echo_port"]:
        echo = _dual_stack(_TCPServer) if ipv6 else _TCPServer
        servers.append(echo((host, spec["echo_port"]), _Echo))
    if spec["http_port"]:
        _Http.pod_name = spec["name"]
        http = _dual_stack(_HttpServer) if ipv6 else _HttpServer
        servers.append(http((host, spec["http_port"]), _Http))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if spec["dns_records"] is not None:
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind(("0.0.0.0", 53))
        records = {k.lower().rstrip("."): v for k, v in spec["dns_records"].items()}
        threading.Thread(target=_serve_dns, args=(dns, records), daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    main()
