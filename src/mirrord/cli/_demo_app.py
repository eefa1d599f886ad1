"""The sample app `mirrord demo` runs through `mirrord run`: it prints what it sees.

Run as a plain script (`python3 _demo_app.py`), with the layer preloaded by mirrord. It reads
an environment variable, a file that only exists in the pod, resolves a name only the pod's
hosts file knows, fetches from a service on the pod's loopback, then listens on the pod's
HTTP port and answers one request stolen from the pod. Each step reports failure instead of
stopping the demo.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C on `mirrord demo` (which says so and cleans up): end quietly, at any moment."""
    del signum, frame
    sys.exit(130)


# `mirrord demo` starts this app with SIGINT blocked: a Ctrl-C during the imports below waits
# for the handler instead of printing a KeyboardInterrupt traceback from inside one of them.
signal.signal(signal.SIGINT, _interrupted)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

import os  # noqa: E402
import socket  # noqa: E402
import urllib.request  # noqa: E402

PORT = int(os.environ.get("DEMO_PORT", "8080"))
WAIT = float(os.environ.get("DEMO_STEAL_WAIT", "20"))


def step(name: str, func: object) -> None:
    try:
        value = func() if callable(func) else func
        print(f"  [ok]   {name}: {value}", flush=True)
    except Exception as exc:
        print(f"  [fail] {name}: {type(exc).__name__}: {exc}", flush=True)


def read_file() -> str:
    with open("/app/config.yaml") as f:
        return f.read().strip().replace("\n", " | ")


def resolve() -> str:
    return str(socket.getaddrinfo("demo-db.cluster.local", 5432, proto=socket.IPPROTO_TCP)[0][4][0])


def fetch() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/from-the-demo-app", timeout=10) as r:
        return str(r.read().decode().splitlines()[0])


def steal_one() -> str:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", PORT))
    server.listen(8)
    server.settimeout(WAIT)
    print(f"  ...    listening on :{PORT}; the demo now sends a request to the pod", flush=True)
    try:
        conn, peer = server.accept()
    except TimeoutError:
        raise TimeoutError(f"no request arrived within {WAIT:g} s") from None
    with conn:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        request_line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        body = b"stolen by the demo app running on your machine\n"
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    server.close()
    return f"{request_line!r} from {peer[0]}:{peer[1]}"


def main() -> None:
    print(f"the demo app (pid {os.getpid()}) sees:", flush=True)
    step("env DEMO_GREETING", lambda: os.environ["DEMO_GREETING"])
    step("file /app/config.yaml", read_file)
    step("DNS demo-db.cluster.local", resolve)
    step(f"GET http://127.0.0.1:{PORT}/ (the pod's loopback)", fetch)
    step("a request stolen from the pod", steal_one)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
