"""A stand-in gRPC app (grpcio, no generated code: raw bytes messages), the pod's app or the
user app of the gRPC steal tests.

Run: `python _grpc_app.py NAME HOST PORT [CERT KEY]` -> prints the port, then serves (in TLS
with CERT and KEY, PEM files) `/mirrord.Echo/Say`
(unary: answers `NAME <request> x-user=<metadata>`), `/mirrord.Echo/Chat` (bidirectional:
answers each message the same way, as it comes; prints `chat ended x-user=U` when the call
ends), `/mirrord.Echo/Fail` (ends with status
NOT_FOUND, details `NAME says no`) and `/mirrord.Echo/Deadline` (`NAME True` when the call
came with a deadline of at most 30 s).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc


def _user(context: grpc.ServicerContext) -> str:
    return str(dict(context.invocation_metadata()).get("x-user", ""))


def main() -> None:
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return f"{name} {request.decode()} x-user={_user(context)}".encode()

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        user = _user(context)
        # when the call ends, however: a client that never half-closes ends it by cancelling
        context.add_callback(lambda: print(f"chat ended x-user={user}", flush=True))
        for request in requests:
            yield f"{name} {request.decode()} x-user={user}".encode()

    def deadline(request: bytes, context: grpc.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        return f"{name} {remaining is not None and 0 < remaining <= 30}".encode()

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, f"{name} says no")
        raise AssertionError("abort returns never")

    handler = grpc.method_handlers_generic_handler(
        "mirrord.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Deadline": grpc.unary_unary_rpc_method_handler(deadline),
        },
    )
    # No SO_REUSEPORT (grpcio's default): two user apps on one machine would share the port
    # and answer each other's connections; the second gets another port from mirrord's layer.
    options = [("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    server.add_generic_rpc_handlers((handler,))
    if len(sys.argv) > 5:
        with open(sys.argv[4], "rb") as cert, open(sys.argv[5], "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(bound, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
