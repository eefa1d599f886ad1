"""The steal guard: a separate process that owns an agent's steal rules in the target's network
namespace and removes them when the agent goes away, however it goes (SIGKILL included).

Run as `python -m mirrord.agent._steal_guard --target-pid N --agent-pid M --tag T
[--backend auto|iptables-nft|iptables-legacy|nft] [--clean-stale]` by `StealRules` (`_steal.py`).

Owns: entering the namespace, choosing the backend, finding (and optionally removing) stale
chains of dead agents, applying and removing rules on request, and the cleanup on exit.
Does not own: what to steal (the agent decides; see `_incoming.py`).

Protocol on stdin/stdout, one JSON object a line. The guard first writes
`{"ok": true, "backend": ..., "families": ["ip", "ip6"], "stale": [...], "cleaned": [...]}`
(`families`: where its rules go, IPv6 only when the namespace has it; a `"warning"` when IPv6 is
on but cannot be stolen), or `{"ok": false, "error": ..., "errno": N}` and exits 1. Requests: `{"op": "set", "redirects": [[port, to_port], ...]}`,
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
from collections.abc import Sequence
from typing import Any

from mirrord.agent._steal import (
    BACKENDS,
    FAMILIES,
    IPT_CHAIN_RE,
    NFT_TABLE_RE,
    Redirect,
    alive_socket_name,
    chain_names,
    iptables_nat_script,
    iptables_pin_script,
    iptables_tool,
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
    tools = [("iptables-legacy-save", "/proc/net/ip_tables_names")]
    tools.append(("ip6tables-legacy-save", "/proc/net/ip6_tables_names"))
    for tool, names in tools:
        # the v6 table list missing: nothing legacy there (and listing would register tables)
        if not shutil.which(tool) or (tool.startswith("ip6") and not os.path.exists(names)):
            continue
        out = _run([tool]).stdout
        if any(line.startswith("-A ") for line in out.splitlines()):
            return True
    return False


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


def _ipv6_on() -> bool:
    """Does the namespace we are in have IPv6 (sysctls under /proc/sys/net are those of the
    caller's network namespace)?"""
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False  # no IPv6 in the kernel


def choose_families(backend: str) -> tuple[list[str], str | None]:
    """The families to steal in (`ip`, and `ip6` when the namespace has IPv6) and a warning
    when IPv6 is on but this backend cannot steal it."""
    if not _ipv6_on():
        return ["ip"], None
    tool = "nft" if backend == "nft" else f"{iptables_tool(backend, 'ip6')}-restore"
    if not shutil.which(tool):
        return ["ip"], (
            f"the target's network namespace has IPv6 but {tool} is not installed next to the "
            "agent: IPv6 connections are not stolen (install ip6tables, i.e. the iptables "
            "package, or use the nft backend)"
        )
    return ["ip", "ip6"], None


def _alive(tag: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(alive_socket_name(tag))
        except OSError:
            return False
    return True


def find_tags() -> dict[str, str]:
    """Every agent tag with rules in this namespace (either family) -> the backend holding
    them."""
    found: dict[str, str] = {}
    for backend in ("iptables-nft", "iptables-legacy"):
        for family, names in (("ip", "ip_tables_names"), ("ip6", "ip6_tables_names")):
            tool = iptables_tool(backend, family)
            if not shutil.which(f"{tool}-save"):
                continue
            if backend == "iptables-legacy" and not os.path.exists(f"/proc/net/{names}"):
                continue
            for line in _run([f"{tool}-save"]).stdout.splitlines():
                if line.startswith(":"):
                    m = IPT_CHAIN_RE.match(line[1:].split()[0])
                    if m:
                        found[m.group(1)] = backend
    if shutil.which("nft"):
        for line in _run(["nft", "list", "tables"]).stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in FAMILIES:
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


def _installed_families(backend: str) -> list[str]:
    """The families whose tool for `backend` is installed (what a cleanup can reach)."""
    if backend == "nft":
        return list(FAMILIES)
    return [f for f in FAMILIES if shutil.which(iptables_tool(backend, f))]


def remove_all(
    tag: str, backend: str, *, keep_pin: bool = False, families: Sequence[str] | None = None
) -> None:
    """Remove the rules of `tag` (best effort, each step independent) in `families` (by
    default every family the backend's tools reach: a caller that does not know which
    families the guard used, such as the agent after its guard died)."""
    n = chain_names(tag)
    for family in _installed_families(backend) if families is None else families:
        if backend == "nft":
            if keep_pin:
                for chain in ("pre", "out", "listener"):
                    _try(["nft", "flush", "chain", family, n["nft_table"], chain])
            else:
                _try(["nft", "delete", "table", family, n["nft_table"]])
            continue
        jumps = [j for j in _jumps(tag) if not (keep_pin and j[0] == "raw")]
        if _remove_at_once(backend, family, jumps):
            continue
        cmd = _iptables(backend, family)
        for table, parent, chain in jumps:
            for _ in range(16):  # a jump inserted twice by a crash mid-way
                if _try([*cmd, "-t", table, "-D", parent, "-j", chain]) != 0:
                    break
        for table, _, chain in jumps:
            _try([*cmd, "-t", table, "-F", chain])
            _try([*cmd, "-t", table, "-X", chain])


def _removal_script(saved: str, jumps: Sequence[tuple[str, str, str]]) -> str:
    """A restore input that removes exactly the `jumps` and their chains that `saved` (the
    output of `iptables-save`) shows, jumps inserted twice included; empty if none is there."""
    wanted = {(table, chain) for table, _, chain in jumps}
    parents = {(table, parent, "-j", chain) for table, parent, chain in jumps}
    deletes: dict[str, list[str]] = {}
    chains: dict[str, list[str]] = {}
    table = ""
    for line in saved.splitlines():
        parts = line.split()
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and (table, parts[0][1:]) in wanted:
            chains.setdefault(table, []).append(parts[0][1:])
        elif parts[:1] == ["-A"] and (table, *parts[1:]) in parents:  # "-A PARENT -j OURS"
            deletes.setdefault(table, []).append(f"-D {parts[1]} -j {parts[3]}")
    lines: list[str] = []
    for name in sorted(set(deletes) | set(chains)):
        lines += [f"*{name}", *deletes.get(name, [])]
        for chain in chains.get(name, []):
            lines += [f"-F {chain}", f"-X {chain}"]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def _remove_at_once(backend: str, family: str, jumps: Sequence[tuple[str, str, str]]) -> bool:
    """Remove our jumps and chains of one family in one transaction (two commands instead of
    one per jump and chain: the cleanup after an agent's death must be quick). False when it
    could not, and the caller removes step by step."""
    try:
        saved = _run([f"{iptables_tool(backend, family)}-save"])
        if saved.returncode != 0:
            return False
        script = _removal_script(saved.stdout, jumps)
        return not script or _run(_restore(backend, family), script).returncode == 0
    except GuardError:
        return False


def _iptables(backend: str, family: str = "ip") -> list[str]:
    return [iptables_tool(backend, family)] + (["-w"] if backend == "iptables-legacy" else [])


def _restore(backend: str, family: str) -> list[str]:
    wait = ["-w"] if backend == "iptables-legacy" else []
    return [f"{iptables_tool(backend, family)}-restore", *wait, "--noflush"]


def _jumps(tag: str) -> list[tuple[str, str, str]]:
    """(table, parent chain, our chain) of every jump an iptables backend inserts, in the
    order a removal goes (the pin's last: see "Conntrack" in _steal.py)."""
    n = chain_names(tag)
    return [
        ("nat", "PREROUTING", n["pre"]),
        ("nat", "OUTPUT", n["out"]),
        ("filter", "INPUT", n["in"]),
        ("raw", "PREROUTING", n["pin"]),
        ("raw", "OUTPUT", n["pin"]),
    ]


class Guard:
    def __init__(
        self, tag: str, backend: str, families: Sequence[str] = ("ip",), *, adopt: bool = False
    ) -> None:
        self.tag = tag
        self.backend = backend
        self.families = list(families)
        self.pinned = False
        # Taking over from a guard that died: its rules stay as they are (removing and adding
        # them again would reset stolen connections); the next `set` restores missing jumps.
        self.repair_jumps = adopt and backend != "nft"
        if self.repair_jumps:
            pin = chain_names(tag)["pin"]
            self.pinned = all(
                _try([*_iptables(backend, f), "-t", "raw", "-S", pin]) == 0 for f in self.families
            )

    def _restore_jumps(self) -> None:
        for family in self.families:
            cmd = _iptables(self.backend, family)
            for table, parent, chain in _jumps(self.tag):
                if _try([*cmd, "-t", table, "-C", parent, "-j", chain]) != 0:
                    _check([*cmd, "-t", table, "-I", parent, "1", "-j", chain])

    def set(self, redirects: list[Redirect]) -> None:
        if self.backend == "nft":
            _check(["nft", "-f", "-"], nft_script(self.tag, redirects, self.families))
            self.pinned = True
            return
        first = not self.pinned
        try:
            if first:
                # The pin goes in before any REDIRECT: see "Conntrack" in _steal.py.
                for family in self.families:
                    _check(_restore(self.backend, family), iptables_pin_script(self.tag))
                self.pinned = True
            jumps = first and not self.repair_jumps
            for family in self.families:
                script = iptables_nat_script(self.tag, redirects, with_jumps=jumps)
                _check(_restore(self.backend, family), script)
            if self.repair_jumps:
                self._restore_jumps()
                self.repair_jumps = False
        except GuardError:
            if first:
                self.clear()
            raise

    def clear(self) -> None:
        remove_all(self.tag, self.backend, families=self.families)
        self.pinned = False


def _sentinel(agent_fd: int, guard_rx: int, guard: Guard) -> None:
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
            guard.clear()
            return
        if not guard_alive and _alive(guard.tag):
            return  # a new guard (with a sentinel of its own) took over


def _start_sentinel(agent_fd: int, alive: socket.socket, guard: Guard) -> int | None:
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
            _sentinel(agent_fd, rx, guard)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(rx)
    return tx


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mirrord.agent._steal_guard")
    parser.add_argument("--target-pid", type=int, required=True)
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    parser.add_argument("--clean-stale", action="store_true")
    parser.add_argument("--adopt", action="store_true")
    return parser.parse_args(argv)


def _stale_chains(own_tag: str, clean: bool) -> tuple[list[str], list[str]]:
    """(stale, cleaned): the rules of dead agents in this namespace, reported or removed."""
    stale: list[str] = []
    cleaned: list[str] = []
    for tag, backend in sorted(find_tags().items()):
        if tag == own_tag or _alive(tag):
            continue
        name = f"{backend}:{chain_names(tag)['nft_table' if backend == 'nft' else 'pre']}"
        if clean:
            remove_all(tag, backend)
            cleaned.append(name)
        else:
            stale.append(name)
    return stale, cleaned


def _handle(guard: Guard, line: bytes) -> None:
    """One request from the agent, answered on stdout."""
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


def _serve(guard: Guard, agent_fd: int, alive: socket.socket) -> None:
    """Answer the agent's requests until its pipe closes or it exits."""
    buf = b""
    stdin_fd = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin_fd, agent_fd, alive.fileno()], [], [])
        if alive.fileno() in readable:
            # A liveness probe by another agent's guard: nothing to say.
            conn, _ = alive.accept()
            conn.close()
        if agent_fd in readable:
            return
        if stdin_fd not in readable:
            continue
        chunk = os.read(stdin_fd, 65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            _handle(guard, line)


def _tell_sentinel_done(sentinel_tx: int | None) -> None:
    if sentinel_tx is not None:
        with contextlib.suppress(OSError):
            os.write(sentinel_tx, _DONE)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # The agent's Ctrl-C is not ours: we leave when the agent does, after cleaning up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sentinel_tx: int | None = None
    try:
        agent_fd = os.pidfd_open(args.agent_pid)
        _setns(f"/proc/{args.target_pid}/ns/net")
        alive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        alive.bind(alive_socket_name(args.tag))
        alive.listen(16)
        backend = choose_backend(args.backend)
        families, warning = choose_families(backend)
        guard = Guard(args.tag, backend, families, adopt=args.adopt)
        sentinel_tx = _start_sentinel(agent_fd, alive, guard)
        stale, cleaned = _stale_chains(args.tag, args.clean_stale)
    except (GuardError, OSError) as exc:
        message = exc.message if isinstance(exc, GuardError) else str(exc)
        code = exc.errno if isinstance(exc, GuardError | OSError) and exc.errno else errno.EIO
        _reply({"ok": False, "error": message, "errno": code})
        _tell_sentinel_done(sentinel_tx)  # nothing of ours is in place
        return 1
    reply = {"ok": True, "backend": backend, "families": families, "stale": stale}
    _reply({**reply, "cleaned": cleaned, **({"warning": warning} if warning else {})})
    try:
        _serve(guard, agent_fd, alive)
    finally:
        guard.clear()
        _tell_sentinel_done(sentinel_tx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
