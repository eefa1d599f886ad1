"""No peer grows the daemon's or the agent's memory without bound, nor stalls them (issue 20
item 4): unread control replies, unauthenticated agent connections that send half a frame, a
flood of short control lines. Each test stops as soon as the bound is passed (so a failing run
costs little), beside a healthy session that must keep working."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest

from mirrord.protocol import MAX_FRAME_SIZE
from tests.reliability._session import Scene, assert_healthy, healthy_scene
from tests.reliability.conftest import record_figures, rss_kib

pytestmark = pytest.mark.netns

GROWTH_LIMIT_KIB = 32 * 1024  # well above a Python process's noise (a few MiB)


def test_unread_control_replies_are_bounded(scene_factory: Callable[[str], Scene]) -> None:
    scene, daemon, _ = healthy_scene(scene_factory)
    before = rss_kib(daemon)
    batch = b'{"id": 1, "op": "status"}\n' * 1000
    outcome = "unbounded"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(scene.cli.runtime / "mirrordd.sock"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that never reads
        sock.settimeout(5)
        for _ in range(500):
            try:
                sock.sendall(batch)
            except TimeoutError:
                outcome = "the daemon stopped reading"  # back-pressure: bounded too
                break
            except OSError:
                outcome = "closed"
                break
            if rss_kib(daemon) - before > GROWTH_LIMIT_KIB:
                break
    growth = rss_kib(daemon) - before
    record_figures(
        "test_unread_control_replies_are_bounded", {"outcome": outcome, "growth_kib": growth}
    )
    assert growth < GROWTH_LIMIT_KIB and outcome != "unbounded", (outcome, growth)
    assert_healthy(scene, time.monotonic())


def test_unauthenticated_agent_connections_are_capped(
    scene_factory: Callable[[str], Scene],
) -> None:
    scene, _, agent = healthy_scene(scene_factory)
    (path,) = scene.cli.runtime.glob("agent-*.sock")
    before = rss_kib(agent)
    # half of the biggest frame the agent accepts, before any Hello
    half_frame = struct.pack(">I", MAX_FRAME_SIZE - 1) + b"\0" * (MAX_FRAME_SIZE // 2)
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            try:
                sock.connect(str(path))
                sock.sendall(half_frame)
            except OSError:  # refused, closed, or not read (a timeout): not buffered
                refused += 1
                sock.close()
                continue
            held.append(sock)
            if rss_kib(agent) - before > GROWTH_LIMIT_KIB:
                break
        growth = rss_kib(agent) - before
        record_figures(
            "test_unauthenticated_agent_connections_are_capped",
            {"held": len(held), "refused": refused, "growth_kib": growth},
        )
        assert growth < GROWTH_LIMIT_KIB, (len(held), refused, growth)
        assert_healthy(scene, time.monotonic())
    finally:
        for sock in held:
            sock.close()


def test_a_flood_of_short_control_lines_does_not_stall_the_daemon(
    scene_factory: Callable[[str], Scene],
) -> None:
    scene, _, _ = healthy_scene(scene_factory)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(scene.cli.runtime / "mirrordd.sock"))
        reader = sock.makefile("rb")
        started = time.monotonic()
        sock.sendall(b"\n" * (512 * 1024) + b'{"id": 7, "op": "status"}\n')  # blank: no reply
        answer = reader.readline()
        seconds = time.monotonic() - started
        reader.close()
    record_figures("test_a_flood_of_short_control_lines", {"answer_s": round(seconds, 2)})
    assert b'"id":7' in answer.replace(b" ", b"")
    assert seconds < 3, f"the daemon took {seconds:.1f} s over 512 Ki blank lines"
