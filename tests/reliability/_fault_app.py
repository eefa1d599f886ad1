"""The user app of the fault matrix, run as `mirrord run --steal -- python _fault_app.py PHASE`.

It steals port 8080 (so the agent, its steal guard and the pod's rules exist in every phase),
then does the phase's work in a loop and prints what happens to it, one event a line:
`listening`, `ready` (the first unit of work done), `error <ERRNO>` (a unit failed; printed
once per change), `ok` (working again after an error), `eof` (the stolen connection ended),
`count <N>` (units done so far, every 0.2 s while it grows).

Phases: `startup` and `read` loop over reading the pod-only file /app/test.txt; `outgoing`
echoes 512 bytes at a time through the pod's echo service (127.0.0.1:7777 in the pod);
`stolen` accepts a stolen connection and echoes what it reads.

`RELIABILITY_LAYER_TIMEOUT_MS` shortens the layer's `timeout_ms` for this process (the quick
size of the suite cannot afford the default 30 s): the app re-executes itself once with the
setting appended to `MIRRORD_LAYER_CONFIG` (a later line wins).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time

want = os.environ.get("RELIABILITY_LAYER_TIMEOUT_MS")
config = os.environ.get("MIRRORD_LAYER_CONFIG", "")
if want and config and not config.rstrip("\n").endswith(f"timeout_ms={want}"):
    os.environ["MIRRORD_LAYER_CONFIG"] = config.rstrip("\n") + f"\ntimeout_ms={want}\n"
    os.execv(sys.executable, [sys.executable, *sys.argv])


def say(*words: object) -> None:
    print(*words, flush=True)


phase = sys.argv[1]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", 8080))
listener.listen(64)
listener.settimeout(0.5)
say("listening")

outgoing: socket.socket | None = None
stolen: socket.socket | None = None


def read_once() -> None:
    with open("/app/test.txt", "rb") as f:
        if f.read() != b"hello from the pod\n":
            raise OSError(errno.EBADMSG, "wrong content")


def outgoing_once() -> None:
    global outgoing
    if outgoing is None:
        outgoing = socket.create_connection(("127.0.0.1", 7777), timeout=60)
    payload = os.urandom(512)
    try:
        outgoing.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = outgoing.recv(len(payload) - len(got))
            if not chunk:
                raise OSError(errno.ECONNRESET, "echo ended")
            got += chunk
        if got != payload:
            raise OSError(errno.EBADMSG, "echo differs")
    except OSError:
        outgoing.close()
        outgoing = None
        raise


def stolen_once() -> bool:
    """Echo one read of the stolen connection; False when there was nothing to do."""
    global stolen
    conn = stolen
    if conn is None:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return False
        conn.settimeout(None)
        stolen = conn
    try:
        data = conn.recv(65536)
        if not data:
            conn.close()
            stolen = None
            say("eof")
            return False
        conn.sendall(data)
    except OSError:
        conn.close()
        stolen = None
        raise
    return True


state = ""
count = 0
last_count = -1
last_report = 0.0
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        if phase == "stolen":
            if not stolen_once():
                continue
        elif phase == "outgoing":
            outgoing_once()
        else:
            read_once()
        count += 1
        if state != "ok":
            say("ok" if state else "ready")
            state = "ok"
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if state != f"error {name}":
            say("error", name)
            state = f"error {name}"
        time.sleep(0.05)
    now = time.monotonic()
    if count != last_count and now - last_report >= 0.2:
        say("count", count)
        last_count, last_report = count, now
    if phase != "stolen":
        time.sleep(0.005)
