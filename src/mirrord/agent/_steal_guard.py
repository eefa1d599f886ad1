"""The steal guard: a separate process that owns an agent's steal rules in the target's network
namespace and removes them when the agent goes away, however it goes (SIGKILL included).

Run as `python -m mirrord.agent._steal_guard --target-pid N --agent-pid M --tag T
[--backend auto|iptables-nft|iptables-legacy|nft] [--clean-stale]` by `StealRules` (`_steal.py`).

Owns: entering the namespace, choosing the backend, finding (and optionally removing) stale
chains of dead agents, applying and removing rules on request, and the cleanup on exit.
Does not own: what to steal (the agent decides; see `_incoming.py`).

Protocol on stdin/stdout, one JSON object a line. The guard first writes
`{"ok": true, "backend": ..., "stale": [...], "cleaned": [...]}` (or `{"ok": false, "error":
..., "errno": N}` and exits 1). Requests: `{"op": "set", "redirects": [[port, to_port], ...]}`,
`{"op": "clear"}`; each is answered `{"ok": true}` or `{"ok": false, ...}`. When stdin closes
or the agent's pidfd says the agent exited, the guard removes every rule of its tag and exits 0.
It is single-threaded, so `setns` moves the whole process and every command it runs.

`--adopt`: the agent starts a new guard for the same tag after the previous one died; the rules
in place are taken over as they are (no reset of stolen connections), missing jumps restored.

The sentinel: the guard forks one child (same command line; its parent is the guard) that
holds nothing but the agent's pidfd and a pipe from the guard. If the guard is killed, the
sentinel keeps watching the agent, and removes the rules itself if the agent dies before a new
guard of the same tag is alive (then it exits); so `kill -9` of the guard and then of the agent
leaves nothing either. When the guard ends normally it says so on the pipe and the sentinel
exits with it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

from mirrord.agent._steal import (
    BACKENDS,
    IPT_CHAIN_RE,
    NFT_TABLE_RE,
    Redirect,
    alive_socket_name,
    chain_names,
    iptables_nat_script,
    iptables_pin_script,
    nft_script,
)

CLONE_NEWNET = 0x40000000
_CMD_TIMEOUT = 20.0
_GUARD_GRACE = 1.0  # the sentinel lets a living guard clean up first, this long at most
_SENTINEL_POLL = 0.5  # how often a sentinel whose guard died looks for its successor
_DONE = b"d"  # guard -> sentinel: every rule is removed, we both end


class GuardError(Exception):
    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno_


def _setns(path: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise GuardError(f"cannot enter the network namespace {path}: {os.strerror(err)}", err)
    finally:
        os.close(fd)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        # e.g. iptables-legacy waiting for the xtables lock another program holds
        raise GuardError(
            f"{' '.join(argv)} did not finish within {_CMD_TIMEOUT:g} s (is another program "
            "holding the xtables lock?)",
            errno.ETIMEDOUT,
        ) from None
    except OSError as exc:
        raise GuardError(f"cannot run {argv[0]}: {exc.strerror}", exc.errno or errno.EIO) from None


def _check(argv: list[str], stdin: str | None = None) -> str:
    proc = _run(argv, stdin)
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip()
        code = errno.EPERM if "ermission denied" in msg else errno.EIO
        raise GuardError(f"{' '.join(argv)} failed: {msg}", code)
    return proc.stdout


def _legacy_in_use() -> bool:
    """Does this namespace already hold iptables-legacy rules (an old kube-proxy, a CNI)?
    Mixing backends in one namespace makes the rule order unpredictable."""
    if not shutil.which("iptables-legacy-save"):
        return False
    out = _run(["iptables-legacy-save"]).stdout
    return any(line.startswith("-A ") for line in out.splitlines())


def choose_backend(requested: str) -> str:
    if requested != "auto":
        tool = requested if requested == "nft" else f"{requested}-restore"
        if not shutil.which(tool):
            raise GuardError(f"steal backend {requested} requested but {tool} is not installed")
        return requested
    if _legacy_in_use():
        return "iptables-legacy"
    for backend in ("iptables-nft", "nft", "iptables-legacy"):
        if shutil.which(backend if backend == "nft" else f"{backend}-restore"):
            return backend
    raise GuardError(
        "no iptables-nft, nft or iptables-legacy found: install iptables or nftables",
        errno.ENOTSUP,
    )


def _alive(tag: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(alive_socket_name(tag))
        except OSError:
            return False
    return True


def find_tags() -> dict[str, str]:
    """Every agent tag with rules in this namespace -> the backend holding them."""
    found: dict[str, str] = {}
    for backend in ("iptables-nft", "iptables-legacy"):
        if not shutil.which(f"{backend}-save"):
            continue
        if backend == "iptables-legacy" and not os.path.exists("/proc/net/ip_tables_names"):
            continue
        for line in _run([f"{backend}-save"]).stdout.splitlines():
            if line.startswith(":"):
                m = IPT_CHAIN_RE.match(line[1:].split()[0])
                if m:
                    found[m.group(1)] = backend
    if shutil.which("nft"):
        for line in _run(["nft", "list", "tables"]).stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "ip":
                m = NFT_TABLE_RE.match(parts[2])
                if m:
                    found[m.group(1)] = "nft"
    return found


def _try(argv: list[str]) -> int:
    """Run a cleanup step; its failure never stops the next one. The exit status, or -1."""
    try:
        return _run(argv).returncode
    except GuardError:
        return -1


def remove_all(tag: str, backend: str, *, keep_pin: bool = False) -> None:
    """Remove the rules of `tag` (best effort, each step independent)."""
    n = chain_names(tag)
    if backend == "nft":
        if keep_pin:
            for chain in ("pre", "out", "listener"):
                _try(["nft", "flush", "chain", "ip", n["nft_table"], chain])
        else:
            _try(["nft", "delete", "table", "ip", n["nft_table"]])
        return
    cmd = [backend] + (["-w"] if backend == "iptables-legacy" else [])
    jumps = [
        ("nat", "PREROUTING", n["pre"]),
        ("nat", "OUTPUT", n["out"]),
        ("filter", "INPUT", n["in"]),
    ]
    if not keep_pin:
        jumps += [("raw", "PREROUTING", n["pin"]), ("raw", "OUTPUT", n["pin"])]
    for table, parent, chain in jumps:
        for _ in range(16):  # a jump inserted twice by a crash mid-way
            if _try([*cmd, "-t", table, "-D", parent, "-j", chain]) != 0:
                break
    for table, _, chain in jumps:
        _try([*cmd, "-t", table, "-F", chain])
        _try([*cmd, "-t", table, "-X", chain])


def _iptables(backend: str) -> list[str]:
    return [backend] + (["-w"] if backend == "iptables-legacy" else [])


def _jumps(tag: str) -> list[tuple[str, str, str]]:
    """(table, parent chain, our chain) of every jump an iptables backend inserts."""
    n = chain_names(tag)
    return [
        ("raw", "PREROUTING", n["pin"]),
        ("raw", "OUTPUT", n["pin"]),
        ("filter", "INPUT", n["in"]),
        ("nat", "PREROUTING", n["pre"]),
        ("nat", "OUTPUT", n["out"]),
    ]


class Guard:
    def __init__(self, tag: str, backend: str, *, adopt: bool = False) -> None:
        self.tag = tag
        self.backend = backend
        self.pinned = False
        # Taking over from a guard that died: its rules stay as they are (removing and adding
        # them again would reset stolen connections); the next `set` restores missing jumps.
        self.repair_jumps = adopt and backend != "nft"
        if self.repair_jumps:
            pin = chain_names(tag)["pin"]
            self.pinned = _try([*_iptables(backend), "-t", "raw", "-S", pin]) == 0

    def _restore_jumps(self) -> None:
        cmd = _iptables(self.backend)
        for table, parent, chain in _jumps(self.tag):
            if _try([*cmd, "-t", table, "-C", parent, "-j", chain]) != 0:
                _check([*cmd, "-t", table, "-I", parent, "1", "-j", chain])

    def set(self, redirects: list[Redirect]) -> None:
        if self.backend == "nft":
            _check(["nft", "-f", "-"], nft_script(self.tag, redirects))
            self.pinned = True
            return
        restore = [f"{self.backend}-restore", "--noflush"]
        if self.backend == "iptables-legacy":
            restore.insert(1, "-w")
        first = not self.pinned
        if first:
            # The pin goes in before any REDIRECT: see "Conntrack" in _steal.py.
            _check(restore, iptables_pin_script(self.tag))
            self.pinned = True
        try:
            _check(
                restore,
                iptables_nat_script(
                    self.tag, redirects, with_jumps=first and not self.repair_jumps
                ),
            )
            if self.repair_jumps:
                self._restore_jumps()
                self.repair_jumps = False
        except GuardError:
            if first:
                remove_all(self.tag, self.backend)
                self.pinned = False
            raise

    def clear(self) -> None:
        remove_all(self.tag, self.backend)
        self.pinned = False


def _sentinel(agent_fd: int, guard_rx: int, tag: str, backend: str) -> None:
    """The sentinel's life (see the module docstring). Returns when it may exit."""
    guard_alive = True
    while True:
        watched = [agent_fd, guard_rx] if guard_alive else [agent_fd]
        readable, _, _ = select.select(watched, [], [], None if guard_alive else _SENTINEL_POLL)
        if guard_alive and guard_rx in readable:
            if os.read(guard_rx, 1) == _DONE:
                return  # the guard removed everything and ends
            guard_alive = False  # killed: the agent starts a new guard, or dies
            continue
        if agent_fd in readable:
            if guard_alive:
                ready, _, _ = select.select([guard_rx], [], [], _GUARD_GRACE)
                if ready and os.read(guard_rx, 1) == _DONE:
                    return
            remove_all(tag, backend)
            return
        if not guard_alive and _alive(tag):
            return  # a new guard (with a sentinel of its own) took over


def _start_sentinel(agent_fd: int, alive: socket.socket, tag: str, backend: str) -> int | None:
    """Fork the sentinel; the guard's end of its pipe (write `_DONE` before a normal exit),
    or None if it could not be started (the guard works without it)."""
    try:
        rx, tx = os.pipe()
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:
        code = 0
        try:
            os.close(tx)
            alive.close()  # the liveness socket is the guard's alone
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # the agent's pipes must see the guard's end, not ours
                os.dup2(null, fd)
            _sentinel(agent_fd, rx, tag, backend)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(rx)
    return tx


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirrord.agent._steal_guard")
    parser.add_argument("--target-pid", type=int, required=True)
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    parser.add_argument("--clean-stale", action="store_true")
    parser.add_argument("--adopt", action="store_true")
    args = parser.parse_args(argv)
    # The agent's Ctrl-C is not ours: we leave when the agent does, after cleaning up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    guard: Guard | None = None
    sentinel_tx: int | None = None
    try:
        agent_fd = os.pidfd_open(args.agent_pid)
        _setns(f"/proc/{args.target_pid}/ns/net")
        alive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        alive.bind(alive_socket_name(args.tag))
        alive.listen(16)
        backend = choose_backend(args.backend)
        guard = Guard(args.tag, backend, adopt=args.adopt)
        sentinel_tx = _start_sentinel(agent_fd, alive, args.tag, backend)
        stale: list[str] = []
        cleaned: list[str] = []
        for tag, tag_backend in sorted(find_tags().items()):
            if tag == args.tag or _alive(tag):
                continue
            name = (
                f"{tag_backend}:{chain_names(tag)['nft_table' if tag_backend == 'nft' else 'pre']}"
            )
            if args.clean_stale:
                remove_all(tag, tag_backend)
                cleaned.append(name)
            else:
                stale.append(name)
    except (GuardError, OSError) as exc:
        message = exc.message if isinstance(exc, GuardError) else str(exc)
        code = exc.errno if isinstance(exc, GuardError | OSError) and exc.errno else errno.EIO
        _reply({"ok": False, "error": message, "errno": code})
        if sentinel_tx is not None:
            with contextlib.suppress(OSError):
                os.write(sentinel_tx, _DONE)  # nothing of ours is in place
        return 1
    _reply({"ok": True, "backend": backend, "stale": stale, "cleaned": cleaned})

    try:
        buf = b""
        stdin_fd = sys.stdin.fileno()
        while True:
            readable, _, _ = select.select([stdin_fd, agent_fd, alive.fileno()], [], [])
            if alive.fileno() in readable:
                # A liveness probe by another agent's guard: nothing to say.
                conn, _ = alive.accept()
                conn.close()
            if agent_fd in readable:
                break
            if stdin_fd not in readable:
                continue
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                try:
                    if request["op"] == "set":
                        guard.set([Redirect(int(p), int(t)) for p, t in request["redirects"]])
                    elif request["op"] == "clear":
                        guard.clear()
                    else:
                        raise GuardError(f"unknown op {request['op']!r}", errno.EINVAL)
                except GuardError as exc:
                    _reply({"ok": False, "error": exc.message, "errno": exc.errno})
                else:
                    _reply({"ok": True})
    finally:
        guard.clear()
        if sentinel_tx is not None:
            with contextlib.suppress(OSError):
                os.write(sentinel_tx, _DONE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
