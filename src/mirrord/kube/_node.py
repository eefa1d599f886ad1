"""The node agent of the Helm chart's DaemonSet: one long-lived pod per node that starts a
`mirrord-agent` per target container on demand and splices each port-forwarded
connection to it.

Owns: the node agent's small preamble protocol and the per-target agent processes. A
connection starts with one line

    MIRRORD-NODE target=container/ID secret=SECRET\\n

and is answered with `OK\\n` (after which the bytes are the agent protocol, spliced to the
agent) or `ERROR <what happened>\\n` and closed. Agents are keyed by (target, secret): sessions
of one daemon share one agent; a second daemon brings its own secret and gets its own agent.
An agent exits by itself after its idle timeout; the next connection starts a new one.
Does not own the agent protocol, and imports nothing of the agent or of kubernetes_asyncio:
it runs inside the agent image and only starts `mirrord-agent` processes (`python -m
mirrord.agent` of its own interpreter, so the agent is always of its own version). Runs on
asyncio, on uvloop where it imports (`mirrord._loop`), as the daemon does.

Run as `python -m mirrord.kube._node --listen tcp:0.0.0.0:61337 [--idle-timeout 60]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from mirrord._loop import asyncio_options

__all__ = ["PREAMBLE", "main"]

PREAMBLE = b"MIRRORD-NODE "
_LINE_LIMIT = 4096
_PREAMBLE_RE = re.compile(
    r"^MIRRORD-NODE target=(container/[A-Za-z0-9][A-Za-z0-9_.-]{7,127}|pid/[0-9]{1,10}) "
    r"secret=([A-Za-z0-9_-]{16,256})$"
)
_READY = b"mirrord-agent ready "
_ERROR = b"mirrord-agent: error: "
_START_TIMEOUT = 20.0


@dataclass
class _Agent:
    socket_path: Path
    process: anyio.abc.Process


class NodeAgent:
    def __init__(self, runtime_dir: Path, idle_timeout: int, agent_argv: list[str]) -> None:
        self.runtime_dir = runtime_dir
        self.idle_timeout = idle_timeout
        self.agent_argv = agent_argv
        self._agents: dict[str, _Agent] = {}
        self._locks: dict[str, anyio.Lock] = {}

    async def _agent_for(self, tg: anyio.abc.TaskGroup, target: str, secret: str) -> _Agent:
        key = hashlib.sha256(f"{target}\0{secret}".encode()).hexdigest()[:24]
        async with self._locks.setdefault(key, anyio.Lock()):
            agent = self._agents.get(key)
            if agent is not None and agent.process.returncode is None:
                return agent
            sock = self.runtime_dir / f"agent-{key}.sock"
            sock.unlink(missing_ok=True)
            env = {**os.environ, "MIRRORD_AGENT_SECRET": secret}
            process = await anyio.open_process(
                [
                    *self.agent_argv,
                    "--target",
                    target,
                    "--listen",
                    f"unix:{sock}",
                    "--idle-timeout",
                    str(self.idle_timeout),
                ],
                stdin=None,
                env=env,
            )
            try:
                await self._wait_ready(process, target)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.aclose()
                raise
            agent = _Agent(sock, process)
            self._agents[key] = agent
            tg.start_soon(self._reap, key, agent)
            return agent

    async def _wait_ready(self, process: anyio.abc.Process, target: str) -> None:
        assert process.stdout is not None and process.stderr is not None
        buf = b""
        with anyio.fail_after(_START_TIMEOUT):
            while True:
                try:
                    chunk = await process.stdout.receive()
                except anyio.EndOfStream:
                    err = b""
                    with contextlib.suppress(Exception):
                        err = await process.stderr.receive()
                    lines = [ln for ln in err.splitlines() if ln.startswith(_ERROR)]
                    why = (
                        lines[-1][len(_ERROR) :].decode(errors="replace")
                        if lines
                        else (
                            f"the agent exited before it was ready ({err[-300:].decode(errors='replace')})"
                        )
                    )
                    raise RuntimeError(f"agent for {target} failed: {why}") from None
                buf += chunk
                if _READY in buf:
                    return

    async def _reap(self, key: str, agent: _Agent) -> None:
        """Drain the agent's output into our log and forget it when it exits."""
        assert agent.process.stdout is not None and agent.process.stderr is not None

        async def drain(stream: anyio.abc.ByteReceiveStream) -> None:
            async for chunk in stream:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, agent.process.stdout)
            tg.start_soon(drain, agent.process.stderr)
        await agent.process.wait()
        if self._agents.get(key) is agent:
            del self._agents[key]
        agent.socket_path.unlink(missing_ok=True)

    async def handle(self, tg: anyio.abc.TaskGroup, client: anyio.abc.SocketStream) -> None:
        async with client:
            line = b""
            with anyio.move_on_after(10):
                while b"\n" not in line and len(line) < _LINE_LIMIT:
                    try:
                        line += await client.receive(_LINE_LIMIT - len(line))
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            head, _, rest = line.partition(b"\n")
            m = _PREAMBLE_RE.match(head.decode(errors="replace"))
            if m is None:
                with contextlib.suppress(Exception):
                    await client.send(b"ERROR expected 'MIRRORD-NODE target=... secret=...'\n")
                return
            try:
                agent = await self._agent_for(tg, m.group(1), m.group(2))
                upstream = await anyio.connect_unix(str(agent.socket_path))
            except (RuntimeError, OSError, TimeoutError) as exc:
                with contextlib.suppress(Exception):
                    await client.send(f"ERROR {exc}\n".encode())
                return
            async with upstream:
                await client.send(b"OK\n")
                if rest:
                    await upstream.send(rest)
                await _splice(client, upstream)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _copy(
    src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream
) -> tuple[str | None, str | None]:
    """Copy `src` to `dst` until either ends; why reading `src` broke and why writing `dst`
    broke (None, None at an ordinary end)."""
    read_broke: str | None = None
    write_broke: str | None = None
    try:
        async for chunk in src:
            try:
                await dst.send(chunk)
            except (anyio.BrokenResourceError, OSError) as exc:
                write_broke = _why(exc)
                break
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        pass
    except (anyio.BrokenResourceError, OSError) as exc:
        read_broke = _why(exc)
    with contextlib.suppress(Exception):
        await dst.send_eof()
    return read_broke, write_broke


async def _splice(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream) -> str | None:
    """Copy both ways until either end ends (port-forward has no half-close: one end means
    both); why `b` broke, if it did (the node agent's upstream, the Kubernetes helper's
    port-forward), whichever way met it first: a read of `b`, or a write to `b` (the app
    kept sending while its agent pod went)."""
    broke: str | None = None
    async with anyio.create_task_group() as tg:

        async def one_way(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
            nonlocal broke
            read_broke, write_broke = await _copy(src, dst)
            why = read_broke if src is b else write_broke
            if why is not None and broke is None:
                broke = why
            tg.cancel_scope.cancel()

        tg.start_soon(one_way, a, b)
        tg.start_soon(one_way, b, a)
    return broke


async def serve(host: str, port: int, node: NodeAgent) -> None:
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    print(f"mirrord-node-agent listening on {host}:{port}", flush=True)
    async with anyio.create_task_group() as tg, listener:

        async def handle(client: anyio.abc.SocketStream) -> None:
            await node.handle(tg, client)

        await listener.serve(handle, task_group=tg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mirrord-node-agent")
    p.add_argument("--listen", required=True, help="tcp:HOST:PORT")
    p.add_argument("--idle-timeout", type=int, default=60)
    p.add_argument("--runtime-dir", default=None)
    args = p.parse_args(argv)
    kind, _, addr = args.listen.partition(":")
    host, _, port_text = addr.rpartition(":")
    if kind != "tcp" or not port_text.isdigit():
        sys.exit("mirrord-node-agent: error: --listen must be tcp:HOST:PORT")
    own_dir = args.runtime_dir is None
    runtime = Path(args.runtime_dir or tempfile.mkdtemp(prefix="mirrord-node-"))
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The agent of this installation, never a `mirrord-agent` found on PATH: another one there
    # (an older install, another checkout) would be another version of the agent protocol and
    # of the code this node agent was tested with.
    node = NodeAgent(runtime, args.idle_timeout, [sys.executable, "-m", "mirrord.agent"])
    # SIGTERM (pod deletion) ends the loop like Ctrl-C, so the finally below runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(
                serve,
                host or "0.0.0.0",
                int(port_text),
                node,
                backend="asyncio",
                backend_options=asyncio_options(),
            )
    finally:
        if own_dir:
            shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
