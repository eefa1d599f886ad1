"""A stand-in app serving HTTPS: the pod's app or the user app of the HTTPS steal tests.

Run: `python _tls_app.py NAME HOST PORT CERT KEY [IDLE]` -> prints the port, then serves TLS with
ALPN `h2` and `http/1.1`: HTTP/2 as `_h2_app.py` answers it, HTTP/1.1 (also without ALPN) as
`_local_app.py` does, each request with `NAME METHOD PATH x-user=<header>\\n` + its body.
An optional IDLE (seconds): an HTTP/1.1 connection idle that long is closed by the app.
With CERT `plain`, the same without TLS (HTTP/2 with prior knowledge, or HTTP/1.1): a user app
that serves plain HTTP.
"""

from __future__ import annotations

import importlib
import os
import socket
import ssl
import sys
import threading
from typing import Any

# The sibling apps, found next to this file (it runs as a script, also inside a pod).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_h2_app: Any = importlib.import_module("_h2_app")
_local_app: Any = importlib.import_module("_local_app")


def _serve(raw: socket.socket, ctx: ssl.SSLContext | None, name: str) -> None:
    try:
        sock = ctx.wrap_socket(raw, server_side=True) if ctx is not None else raw
    except (OSError, ValueError):
        raw.close()
        return
    try:
        if isinstance(sock, ssl.SSLSocket):
            h2 = sock.selected_alpn_protocol() == "h2"
        else:  # plain: HTTP/2 with prior knowledge, or HTTP/1.1
            h2 = sock.recv(3, socket.MSG_PEEK) == b"PRI"
        if h2:
            _h2_app._serve(sock, name)
            return
        _local_app.Handler(sock, sock.getpeername(), None)
    except OSError:
        pass
    finally:
        sock.close()


def main() -> None:
    name, host, port, cert, key = sys.argv[1:6]
    _local_app.Handler.name = name
    if len(sys.argv) > 6:
        _local_app.Handler.timeout = float(sys.argv[6])  # socketserver: idle -> closed
    ctx: ssl.SSLContext | None = None
    if cert != "plain":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(1024)
    print(srv.getsockname()[1], flush=True)
    while True:
        raw, _ = srv.accept()
        threading.Thread(target=_serve, args=(raw, ctx, name), daemon=True).start()


if __name__ == "__main__":
    main()
