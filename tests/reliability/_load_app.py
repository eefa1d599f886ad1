"""The user app of the load checks, run under `mirrord run --steal`.

`echo`: an asyncio echo server on port 8080 (stolen), for any number of concurrent connections;
prints `listening`.
`bulk N`: sends N random bytes through the pod's echo service (127.0.0.1:7777 in the pod, an
outgoing connection) while reading the echo; prints `sent <sha256> got <sha256> <seconds>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
import threading
import time


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(echo, "0.0.0.0", 8080, backlog=4096, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def bulk(total: int) -> None:
    sock = socket.create_connection(("127.0.0.1", 7777), timeout=120)
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0

    def read() -> None:
        nonlocal received
        while received < total:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got.update(chunk)
            received += len(chunk)

    started = time.monotonic()
    reader = threading.Thread(target=read)
    reader.start()
    block = os.urandom(1 << 20)
    left = total
    while left:
        piece = block[: min(left, len(block))]
        sent.update(piece)
        sock.sendall(piece)
        left -= len(piece)
        block = block[1:] + block[:1]  # not the same block over and over
    reader.join()
    seconds = time.monotonic() - started
    sock.close()
    print(f"sent {sent.hexdigest()} got {got.hexdigest()} {received} {seconds:.2f}", flush=True)


if sys.argv[1] == "echo":
    asyncio.run(serve())
else:
    bulk(int(sys.argv[2]))
