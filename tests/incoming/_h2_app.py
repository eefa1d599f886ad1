"""A stand-in app speaking HTTP/2 with prior knowledge (h2c), on the h2 library: the pod's app
or the user app of the HTTP/2 steal tests.

Run: `python _h2_app.py NAME HOST PORT [LOG]` -> prints the port, then serves. Answers each
request with `NAME METHOD PATH x-user=<header>\\n` + the request body; with LOG, also appends
`METHOD PATH x-user=<header> len=<body length>` to that file for each request.
"""

from __future__ import annotations

import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events


def _serve(sock: socket.socket, name: str, log: str | None = None) -> None:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    heads: dict[int, dict[str, str]] = {}
    bodies: dict[int, bytearray] = {}
    pending: dict[int, bytearray] = {}
    with sock:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    heads[ev.stream_id or 0] = {str(k): str(v) for k, v in ev.headers or []}
                    bodies[ev.stream_id or 0] = bytearray()
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id or 0] += ev.data or b""
                    conn.acknowledge_received_data(
                        ev.flow_controlled_length or 0, ev.stream_id or 0
                    )
                elif isinstance(ev, h2.events.StreamEnded):
                    sid = ev.stream_id or 0
                    head = heads.pop(sid)
                    answer = (
                        f"{name} {head[':method']} {head[':path']} "
                        f"x-user={head.get('x-user', '')}\n"
                    ).encode() + bytes(bodies[sid])
                    if log is not None:
                        with open(log, "a") as f:
                            user = head.get("x-user", "")
                            f.write(f"{head[':method']} {head[':path']} x-user={user} ")
                            f.write(f"len={len(bodies[sid])}\n")
                    del bodies[sid]
                    conn.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
                    pending[sid] = bytearray(answer)
            for sid, out in list(pending.items()):
                while out:
                    n = min(
                        len(out), conn.local_flow_control_window(sid), conn.max_outbound_frame_size
                    )
                    if n <= 0:
                        break
                    conn.send_data(sid, bytes(out[:n]))
                    del out[:n]
                if not out:
                    conn.end_stream(sid)
                    del pending[sid]
            sock.sendall(conn.data_to_send())


def main() -> None:
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    log = sys.argv[4] if len(sys.argv) > 4 else None
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1024)
    print(srv.getsockname()[1], flush=True)
    while True:
        sock, _ = srv.accept()
        threading.Thread(target=_serve, args=(sock, name, log), daemon=True).start()


if __name__ == "__main__":
    main()
