"""A stand-in for the user's app: a real HTTP/1.1 server process on the host.

Run: `python _local_app.py NAME [HOST [PORT [log]]]` -> prints the port it listens on
(default 127.0.0.1, any port; an IPv6 HOST such as `::` serves both families), then serves;
with `log` it prints `seen METHOD PATH` for each request. Responses carry `X-Peer: <client address as accept() reported it>`. Also run
inside a pod as a pod-side server with a deep accept queue (http.server's default of 5 resets
connections under 20 concurrent clients).
Answers every request with `NAME METHOD PATH x-user=<header>\\n` + body; `/ws` with an
`Upgrade` header is answered 101 and then echoes raw bytes until the client closes.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading
from typing import Any

_LOG_LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    name = "local"
    log_requests = False

    def _answer(self) -> None:
        if self.path == "/ws" and self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data.upper())
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        user = self.headers.get("x-user", "")
        out = f"{self.name} {self.command} {self.path} x-user={user}\n".encode() + body
        if self.log_requests:
            # one write per line under a lock: handler threads must not interleave lines
            with _LOG_LOCK:
                sys.stdout.write(f"seen {self.command} {self.path}\n")
                sys.stdout.flush()
        self.send_response(200)
        # who the app thinks it talks to: getpeername() of the accepted connection
        self.send_header("X-Peer", f"{self.client_address[0]}")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class DualStackServer(http.server.ThreadingHTTPServer):
    """On an IPv6 address such as `::`, for both families (IPv4 peers as ::ffff:a.b.c.d)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    Handler.name = sys.argv[1] if len(sys.argv) > 1 else "local"
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    Handler.log_requests = sys.argv[4:5] == ["log"]
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    server_class = DualStackServer if ":" in host else http.server.ThreadingHTTPServer
    server = server_class((host, port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
