"""Steal rules: the `nat` REDIRECT rules that send a target's incoming connections to the agent.

Owns: the rule scripts for each backend (iptables-nft, iptables-legacy, nft), the names of the
agent's chains, choosing a backend by what the target's network namespace has, and the
agent-side handle (`StealRules`) of the guard process that applies and removes them.
Does not own: accepting or relaying the stolen connections (`_incoming.py`).

Theory of operation
-------------------
Every rule of an agent lives in chains named after the agent's random tag: iptables chains
`MRD_<tag>_PRE` (nat PREROUTING: traffic from outside the pod), `MRD_<tag>_OUT` (nat OUTPUT,
loopback only: the pod talking to itself), `MRD_<tag>_IN` (filter INPUT: the listener guard,
below) and `MRD_<tag>_PIN` (raw PREROUTING and OUTPUT), or the nft table `ip mirrord_<tag>`
with the same four roles. Other agents (other users' daemons on the same pod) have other tags,
so their rules never collide.

IPv6: when the target's namespace has IPv6 on, the same rules go into the IPv6 tables beside
the IPv4 ones (`ip6tables-nft`/`ip6tables-legacy`, same chain names; or the nft table
`ip6 mirrord_<tag>`, same chains), redirecting to the same listener port (the agent listens on
both families there), and are removed the same way. netfilter keeps conntrack, NAT and the
tables per family, so each family has its own pin. A namespace without IPv6 (`disable_ipv6`, no
IPv6 in the kernel) gets the IPv4 rules only; one with IPv6 but without the backend's IPv6 tool
too, and the agent warns (log and Subscribe reply) that IPv6 connections are not stolen.

- Only SYN packets are redirected (`--syn`): a connection that was open before the steal keeps
  going to the pod's app, and the next one is stolen.
- Conntrack is off in a fresh network namespace until a rule needs it; switching it on or off
  resets connections. The PIN chain holds a conntrack match before any REDIRECT exists and is
  removed last, only when no stolen connection is left.
- The agent's own connections to the pod's app (unmatched filtered requests) carry `SO_MARK`
  `AGENT_MARK` or `AGENT_MARK_SNIFFED`, and the OUTPUT chain RETURNs on either first (one
  match under `AGENT_MARK_MASK`). `AGENT_MARK_SNIFFED` says "the mirror's sniffer saw this
  request arrive from outside already": the sniffer skips packets carrying it.
- The agent's listener is reachable only through a REDIRECT. A connection made straight to
  its port (from the pod or from outside) would otherwise be taken for a stolen one whose
  original destination is the listener itself, relayed "to the pod's app" at that address,
  i.e. to the listener again: a loop that grew by one connection per turn until the fd limit.
  No listening address avoids this by itself: PREROUTING REDIRECT rewrites to the incoming
  interface's primary address (the pod IP) and OUTPUT REDIRECT to 127.0.0.1, both reachable
  by the pod's clients; a DNAT to 127.0.0.1 from outside needs `route_localnet=1`, which
  would open every loopback-only service of the pod to the network. So the IN chain resets
  (REJECT tcp-reset) every connection to the listener's port that conntrack did not
  destination-NAT (`--ctstate DNAT` / `ct status dnat`), and the agent refuses any connection
  whose original destination is its own listener (`_incoming.py`).
- Each change is one atomic transaction (`iptables-restore --noflush` / `nft -f`), so a port is
  never briefly unstolen while another changes.

All commands run in a separate process, the guard (`_steal_guard.py`), which has entered the
target's network namespace. The agent talks to it over a pipe; when the agent dies in any way
(SIGKILL included) the pipe closes and the guard removes every rule before it exits. When the
guard dies, the agent notices (a pidfd of `guard_pid`) and starts a new one for the same tag that
takes the rules over (`restart()`); the guard's sentinel child covers the agent dying before
that (see `_steal_guard.py`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "AGENT_MARK",
    "AGENT_MARK_MASK",
    "AGENT_MARK_SNIFFED",
    "BACKENDS",
    "FAMILIES",
    "StealRules",
    "StealRulesError",
    "alive_socket_name",
    "chain_names",
    "new_tag",
]

log = logging.getLogger("mirrord.agent.incoming")

AGENT_MARK: Final = 0x6D726464  # "mrdd": SO_MARK of the agent's own connections in the pod
# The same with the lowest bit set: a connection repeating bytes that the sniffer saw arrive
# from outside the pod (mirroring it again would duplicate them). Pod-local clients are
# redirected before the sniffer can see them, so their repeat carries AGENT_MARK.
AGENT_MARK_SNIFFED: Final = AGENT_MARK | 1
AGENT_MARK_MASK: Final = 0xFFFFFFFE  # matches both marks
BACKENDS: Final = ("iptables-nft", "iptables-legacy", "nft")
# nft's family names; the iptables tool of a family is `iptables_tool(backend, family)`.
FAMILIES: Final = ("ip", "ip6")
_TAG_RE: Final = re.compile(r"^[0-9a-f]{10}$")
IPT_CHAIN_RE: Final = re.compile(r"^MRD_([0-9a-f]{10})_(PRE|OUT|IN|PIN)$")
NFT_TABLE_RE: Final = re.compile(r"^mirrord_([0-9a-f]{10})$")
_GUARD_TIMEOUT: Final = 30.0
# A guard that answers nothing this long (stopped, stuck) is killed: the agent then replaces
# it. Above the guard's own 20 s per command, of which a change runs up to three.
_REPLY_TIMEOUT: Final = 75.0
# A guard stopped (SIGSTOP, a debugger) this long while a request waits is killed the same way.
_STOPPED_LIMIT: Final = 2.0
_REPLY_POLL: Final = 0.25


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class StealRulesError(OSError):
    """Rules could not be installed or removed; the message has the backend's own error. The
    Subscribe fails with this errno (EPERM without NET_ADMIN, else EIO)."""


def new_tag() -> str:
    return secrets.token_hex(5)


def chain_names(tag: str) -> dict[str, str]:
    """The names of an agent's chains (iptables) and table (nft)."""
    return {
        "pre": f"MRD_{tag}_PRE",
        "out": f"MRD_{tag}_OUT",
        "in": f"MRD_{tag}_IN",
        "pin": f"MRD_{tag}_PIN",
        "nft_table": f"mirrord_{tag}",
    }


def alive_socket_name(tag: str) -> bytes:
    """The abstract unix socket (scoped to the pod's network namespace) that the guard of
    agent `tag` listens on while it lives: chains whose socket nobody holds are stale."""
    return f"\0mirrord-steal-{tag}".encode()


def iptables_tool(backend: str, family: str) -> str:
    """The iptables command of `family` for an iptables backend: `iptables-nft` for "ip",
    `ip6tables-nft` for "ip6" (the same for legacy)."""
    return backend if family == "ip" else backend.replace("iptables", "ip6tables", 1)


# ---------------------------------------------------------------- scripts


@dataclass(frozen=True, slots=True)
class Redirect:
    port: int
    to_port: int


def iptables_pin_script(tag: str) -> str:
    n = chain_names(tag)
    return "\n".join(
        [
            "*raw",
            f":{n['pin']} - [0:0]",
            # The match is what counts (it switches conntrack on for the namespace); RETURN
            # leaves every packet's fate to the rules after ours.
            f"-A {n['pin']} -m conntrack --ctstate INVALID -j RETURN",
            f"-I PREROUTING 1 -j {n['pin']}",
            f"-I OUTPUT 1 -j {n['pin']}",
            "COMMIT",
            "",
        ]
    )


def _listener_ports(redirects: Sequence[Redirect]) -> list[int]:
    return sorted({r.to_port for r in redirects})


def iptables_nat_script(tag: str, redirects: Sequence[Redirect], *, with_jumps: bool) -> str:
    """Declaring a chain in `--noflush` mode empties it, so this replaces our nat rules and
    the listener guard (filter INPUT) in one input."""
    n = chain_names(tag)
    lines = ["*filter", f":{n['in']} - [0:0]"]
    for to_port in _listener_ports(redirects):
        # Reachable only through our REDIRECT: see "listener" in the module docstring.
        lines.append(
            f"-A {n['in']} -p tcp -m tcp --dport {to_port} -m conntrack ! --ctstate DNAT "
            "-j REJECT --reject-with tcp-reset"
        )
    if with_jumps:
        lines.append(f"-I INPUT 1 -j {n['in']}")
    lines += ["COMMIT", "*nat", f":{n['pre']} - [0:0]", f":{n['out']} - [0:0]"]
    lines.append(f"-A {n['out']} -m mark --mark {AGENT_MARK:#x}/{AGENT_MARK_MASK:#x} -j RETURN")
    for r in redirects:
        lines.append(
            f"-A {n['pre']} -p tcp -m tcp --dport {r.port} --syn -j REDIRECT --to-ports {r.to_port}"
        )
        lines.append(
            f"-A {n['out']} -o lo -p tcp -m tcp --dport {r.port} --syn "
            f"-j REDIRECT --to-ports {r.to_port}"
        )
    if with_jumps:
        lines += [f"-I PREROUTING 1 -j {n['pre']}", f"-I OUTPUT 1 -j {n['out']}"]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def nft_script(tag: str, redirects: Sequence[Redirect], families: Sequence[str] = ("ip",)) -> str:
    """Creates (idempotently) and refills the agent's table of each family (`ip`, `ip6`) in one
    transaction."""
    lines: list[str] = []
    for family in families:
        lines += _nft_family_lines(f"{family} {chain_names(tag)['nft_table']}", redirects)
    return "\n".join(lines) + "\n"


def _nft_family_lines(t: str, redirects: Sequence[Redirect]) -> list[str]:
    lines = [
        f"add table {t}",
        f"add chain {t} pin_pre {{ type filter hook prerouting priority -150; }}",
        f"add chain {t} pin_out {{ type filter hook output priority -150; }}",
        # Before other nat chains (dstnat is -100) so a REDIRECT of ours wins.
        f"add chain {t} pre {{ type nat hook prerouting priority -110; }}",
        f"add chain {t} out {{ type nat hook output priority -110; }}",
        f"add chain {t} listener {{ type filter hook input priority -150; }}",
        f"flush chain {t} pin_pre",
        f"flush chain {t} pin_out",
        f"flush chain {t} pre",
        f"flush chain {t} out",
        f"flush chain {t} listener",
        f"add rule {t} pin_pre ct state invalid counter",
        f"add rule {t} pin_out ct state invalid counter",
        f"add rule {t} out meta mark and {AGENT_MARK_MASK:#x} == {AGENT_MARK:#x} return",
    ]
    for r in redirects:
        syn = "tcp flags & (syn | ack) == syn"
        lines.append(f"add rule {t} pre tcp dport {r.port} {syn} redirect to :{r.to_port}")
        lines.append(
            f'add rule {t} out oifname "lo" tcp dport {r.port} {syn} redirect to :{r.to_port}'
        )
    for to_port in _listener_ports(redirects):
        # Reachable only through our redirect: see "listener" in the module docstring.
        lines.append(
            f"add rule {t} listener tcp dport {to_port} ct status & dnat == 0 reject with tcp reset"
        )
    return lines


# ---------------------------------------------------------------- agent side


def _guard_argv(
    *, target_pid: int, backend: str, tag: str, clean_stale: bool, adopt: bool = False
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mirrord.agent._steal_guard",
        "--target-pid",
        str(target_pid),
        "--agent-pid",
        str(os.getpid()),
        "--backend",
        backend,
        "--tag",
        tag,
        *(["--clean-stale"] if clean_stale else []),
        *(["--adopt"] if adopt else []),
    ]


class StealRules:
    """The agent's handle on its guard process. Blocking: call from a worker thread.

    `start()` spawns the guard (which enters the target's network namespace, picks the
    backend, finds stale chains of dead agents and cleans or reports them); `set_redirects()`
    replaces the REDIRECT rules; `clear()` removes everything (pin included); `close()` ends
    the guard, which removes whatever is left.
    """

    def __init__(
        self,
        *,
        target_pid: int,
        backend: str = "auto",
        clean_stale: bool = False,
        tag: str | None = None,
    ) -> None:
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"steal backend {backend!r} is not auto or one of {BACKENDS}")
        self.target_pid = target_pid
        self.requested_backend = backend
        self.clean_stale = clean_stale
        self.tag = tag or new_tag()
        self.backend: str | None = None
        self.families: list[str] = []  # "ip", and "ip6" when the namespace has IPv6
        self.stale: list[str] = []
        self.cleaned: list[str] = []
        self.warnings: list[str] = []  # for the next steal Subscribe's reply (then emptied)
        self.installed = False
        self._proc: subprocess.Popen[str] | None = None
        self.restarts = 0
        self.closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<StealRules tag={self.tag} backend={self.backend} families={self.families} "
            f"installed={self.installed} "
            f"guard={'running' if self.running else 'stopped'}>"
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def guard_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        with self._lock:
            if self._proc is not None:
                return
            self._spawn(adopt=False)

    def restart(self) -> None:
        """The guard died (`running` is False): start a new one for the same tag, which takes
        the rules in place over; the caller then applies its redirects again."""
        with self._lock:
            if self.closed:
                raise StealRulesError(5, "the steal rules are closed")
            old, self._proc = self._proc, None
            if old is not None:
                if old.poll() is None:
                    old.kill()
                old.wait()
                for stream in (old.stdin, old.stdout, old.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
            self.restarts += 1
            self._spawn(adopt=True, backend=self.backend or self.requested_backend)

    def _spawn(self, *, adopt: bool, backend: str | None = None) -> None:
        self._proc = subprocess.Popen(
            _guard_argv(
                target_pid=self.target_pid,
                backend=backend or self.requested_backend,
                tag=self.tag,
                clean_stale=self.clean_stale and not adopt,
                adopt=adopt,
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Its own session: a signal to the agent's process group (Ctrl-C, a killpg)
            # must not take the guard with it before it has cleaned up.
            start_new_session=True,
        )
        reply = self._read_reply()
        self.backend = str(reply["backend"])
        self.families = [str(f) for f in reply.get("families", ["ip"])]
        if reply.get("warning"):
            log.warning("%s", reply["warning"])
            self.warnings.append(str(reply["warning"]))
        self.stale = [str(s) for s in reply.get("stale", [])]
        self.cleaned = [str(s) for s in reply.get("cleaned", [])]

    def _read_reply(self) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        waited, stopped_for = 0.0, 0.0
        while not select.select([proc.stdout], [], [], _REPLY_POLL)[0]:
            waited += _REPLY_POLL
            stopped_for = stopped_for + _REPLY_POLL if _stopped(proc.pid) else 0.0
            if waited >= _REPLY_TIMEOUT or stopped_for >= _STOPPED_LIMIT:
                proc.kill()
                why = "is stopped" if stopped_for >= _STOPPED_LIMIT else "did not answer"
                message = (
                    f"the steal guard (pid {proc.pid}) {why} after {waited:g} s; it was killed "
                    "and will be replaced"
                )
                log.warning("%s", message)
                raise StealRulesError(errno.ETIMEDOUT, message)
        line = proc.stdout.readline()
        if not line:
            err = ""
            if proc.stderr is not None:
                proc.wait(timeout=_GUARD_TIMEOUT)
                err = proc.stderr.read().strip()
            raise StealRulesError(
                5, f"the steal guard exited ({proc.returncode}): {err or 'no output'}"
            )
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise StealRulesError(int(reply.get("errno", 5)), str(reply.get("error")))
        return reply

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None or proc.poll() is not None:
                raise StealRulesError(5, "the steal guard is not running")
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            return self._read_reply()

    def set_redirects(self, redirects: dict[int, int]) -> None:
        """Steal exactly these ports: {port: agent listener port}. Empty keeps the pin."""
        self.start()
        self._call({"op": "set", "redirects": sorted(redirects.items())})
        self.installed = True

    def clear(self) -> None:
        """Remove every rule of ours, pin included (only when no stolen connection is left)."""
        if self._proc is None:
            return
        self._call({"op": "clear"})
        self.installed = False

    def close(self) -> None:
        """End the guard; it removes whatever is left. Idempotent."""
        with self._lock:
            self.closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=_GUARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.installed = False
