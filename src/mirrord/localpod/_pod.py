"""Local pods: a network namespace, a veth pair, a mount namespace and a process inside.

Owns: creating and removing local pods on this machine (used by the tests, `mirrord demo` and
the benchmarks as stand-ins for Kubernetes pods) and clearing the leftovers of dead creators.
Does not own: what runs inside a pod (see `_podinit.py`) or anything about agents.

Layout of one pod, named `mrd<creator pid>x<n>`:
- netns `mrd<pid>x<n>`; veth pair `mrd<pid>h<n>` (host end, root netns, address `.1` of a /30
  in 10.213.0.0/16) <-> `eth0` in the pod (address `.2`), `lo` up, default route via the host;
  a dual-stack pod (`PodSpec.ipv6`) also has `::1` (host end) and `::2` (pod) of the /64
  `fd6d:7264:0:<n>::/64` (a unique local range; `<n>` is the /30's index, so it is as unique),
  added without duplicate address detection so they are usable at once, and an IPv6 default
  route via the host;
- its target process (`LocalPod.pid`), started through `ip netns exec` + `unshare --mount --uts`
  (both exec in place, so the PID is the real python's), that builds its own root (see
  `_podinit.py`) and optionally serves TCP echo and HTTP on 0.0.0.0 (on `::`, dual-stack, in
  a dual-stack pod);
- a host work directory `<tmp>/mrd<pid>x<n>-*` holding the spec, the pod's log and staged
  files.

Names embed the creating PID so concurrent test runs never touch each other's pods:
`cleanup_leftovers()` removes only pods whose creator is dead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["LocalPod", "PodError", "PodSpec", "cleanup_leftovers", "create_pod"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
_POD_NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
# Unique local (fd00::/8), away from fd00::/64 that some hosts use for their own network.
_POD_NETWORK6 = ipaddress.IPv6Network("fd6d:7264::/48")
_LOCK_PATH = "/run/mirrord-localpod.lock"
_NETNS_RE = re.compile(r"^mrd(\d+)x(\d+)$")
_LINK_RE = re.compile(r"^mrd(\d+)[hp](\d+)$")
_WORKDIR_RE = re.compile(r"^mrd(\d+)x(\d+)-")
_READY_TIMEOUT = 20.0
_counter = itertools.count()


class PodError(RuntimeError):
    """A local pod could not be created; the message says which step failed and shows the
    pod's own error output. Check that you run as root with iproute2 and util-linux."""


@dataclass
class PodSpec:
    """What goes into a local pod.

    `env` is the target process's environment on top of `PATH` (always set so the pod can run
    programs). `files` maps absolute pod paths to contents: paths under top-level directories
    the host lacks (`/app`, `/data`, ...) or under `/etc` are pod-only; a path in another host
    directory must already exist there and is covered by a pod-only copy. `symlinks` maps a
    pod path to the link text (absolute or relative). `hosts` adds `name -> address` lines to
    the pod's `/etc/hosts`. Ports of the built-in services are on 0.0.0.0 inside the pod; `None`
    disables a service. `dns_records` (name -> IPv4 or IPv6 address) starts a DNS server on the
    pod's UDP port 53 (the default `resolv.conf` points at 127.0.0.1) answering those names and
    NXDOMAIN for every other name. `ipv6` makes the pod dual-stack: an IPv6 address beside the
    IPv4 one (`LocalPod.ip6`) and the built-in services on both families.
    """

    name: str = "pod"
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(
        default_factory=lambda: {"/app/test.txt": b"hello from the pod\n"}
    )
    symlinks: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)
    resolv_conf: str = DEFAULT_RESOLV_CONF
    hostname: str | None = None
    echo_port: int | None = 7777
    http_port: int | None = 8080
    dns_records: dict[str, str] | None = None
    cwd: str = "/"
    ipv6: bool = False


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise PodError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    # Serialises subnet choice between concurrent creators (several test runs at once).
    fd = os.open(_LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _used_subnets() -> set[int]:
    out = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    used: set[int] = set()
    for m in re.finditer(r"inet (10\.213\.\d+\.\d+)/", out):
        addr = ipaddress.IPv4Address(m.group(1))
        used.add((int(addr) - int(_POD_NETWORK.network_address)) // 4)
    return used


def _pick_subnet() -> int:
    used = _used_subnets()
    total = _POD_NETWORK.num_addresses // 4
    start = (os.getpid() * 131) % total  # spread creators apart; the lock makes it exact
    for i in range(total):
        idx = (start + i) % total
        if idx not in used and idx != 0:
            return idx
    raise PodError("no free /30 left in 10.213.0.0/16: run cleanup_leftovers()")


class LocalPod:
    """A running local pod; a context manager. `close()` is idempotent."""

    def __init__(self, spec: PodSpec, index: int) -> None:
        me = os.getpid()
        self.spec = spec
        self.netns = f"mrd{me}x{index}"
        self.host_if = f"mrd{me}h{index}"
        self.pod_if = "eth0"
        self._peer_if = f"mrd{me}p{index}"  # the pod end's name until it is moved and renamed
        self.hostname = spec.hostname or self.netns
        self.env: dict[str, str] = {"PATH": DEFAULT_PATH, **spec.env}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.netns}-"))
        self.ip = ""
        self.host_ip = ""
        self.ip6 = ""  # a dual-stack pod's IPv6 address; its host end is `host_ip6`
        self.host_ip6 = ""
        self.pid = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._children: list[subprocess.Popen[bytes]] = []
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        ip6 = f" ip6={self.ip6}" if self.ip6 else ""
        return f"<LocalPod {self.netns} pid={self.pid} ip={self.ip}{ip6} {state}>"

    def __enter__(self) -> LocalPod:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- building ----------------------------------------------------------------------------

    def _setup_network(self) -> None:
        _run(["ip", "netns", "del", self.netns], check=False)  # a stale one of a reused pid
        _run(["ip", "link", "del", self.host_if], check=False)
        _run(["ip", "netns", "add", self.netns])
        peer = self._peer_if
        with _address_lock():
            idx = _pick_subnet()
            base = int(_POD_NETWORK.network_address) + 4 * idx
            self.host_ip = str(ipaddress.IPv4Address(base + 1))
            self.ip = str(ipaddress.IPv4Address(base + 2))
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", peer])
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        _run(["ip", "link", "set", peer, "netns", self.netns])
        _run(["ip", "link", "set", self.host_if, "up"])
        ns = ["ip", "-n", self.netns]
        _run([*ns, "link", "set", peer, "name", self.pod_if])
        _run([*ns, "addr", "add", f"{self.ip}/30", "dev", self.pod_if])
        _run([*ns, "link", "set", self.pod_if, "up"])
        _run([*ns, "link", "set", "lo", "up"])
        _run([*ns, "route", "add", "default", "via", self.host_ip])
        if self.spec.ipv6:
            self._setup_ipv6(idx)

    def _setup_ipv6(self, idx: int) -> None:
        net = ipaddress.IPv6Network((int(_POD_NETWORK6.network_address) + (idx << 64), 64))
        self.host_ip6 = str(net.network_address + 1)
        self.ip6 = str(net.network_address + 2)
        ns = ["ip", "-n", self.netns]
        _run(["ip", "-6", "addr", "add", f"{self.host_ip6}/64", "dev", self.host_if, "nodad"])
        _run([*ns, "-6", "addr", "add", f"{self.ip6}/64", "dev", self.pod_if, "nodad"])
        _run([*ns, "-6", "route", "add", "default", "via", self.host_ip6])

    def _etc_files(self) -> dict[str, bytes]:
        hosts = [
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{self.ip}\t{self.hostname}",
        ]
        hosts += [f"{addr}\t{name}" for name, addr in self.spec.hosts.items()]
        return {
            "/etc/hosts": ("\n".join(hosts) + "\n").encode(),
            "/etc/resolv.conf": self.spec.resolv_conf.encode(),
            "/etc/hostname": f"{self.hostname}\n".encode(),
        }

    def _start(self) -> None:
        root = self.workdir / "root"
        root.mkdir()
        files = {**self._etc_files(), **self.spec.files}
        spec_json = {
            "name": self.spec.name,
            "root": str(root),
            "workdir": str(self.workdir),
            "files": {p: base64.b64encode(d).decode() for p, d in files.items()},
            "symlinks": self.spec.symlinks,
            "hostname": self.hostname,
            "echo_port": self.spec.echo_port,
            "http_port": self.spec.http_port,
            "dns_records": self.spec.dns_records,
            "cwd": self.spec.cwd,
            "ipv6": self.spec.ipv6,
        }
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(spec_json))
        init = Path(__file__).with_name("_podinit.py")
        log = open(self.workdir / "pod.log", "wb")  # noqa: SIM115 - the child owns it
        python = os.path.realpath(sys.executable)
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts"]
        argv += ["--propagation", "private", python, "-S", str(init), str(spec_path)]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid = self._proc.pid
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if sel.select(left):
                    line = self._proc.stdout.readline()
                    if line == b"ready\n":
                        return
                    break
        log = (self.workdir / "pod.log").read_text(errors="replace")[-4000:]
        self._proc.poll()
        raise PodError(
            f"pod {self.netns} did not become ready within {_READY_TIMEOUT:.0f} s "
            f"(exit status {self._proc.returncode}); its output:\n{log}"
        )

    # -- using -------------------------------------------------------------------------------

    def _enter_argv(self, argv: Sequence[str]) -> list[str]:
        return [
            "nsenter",
            f"--target={self.pid}",
            "--net",
            "--mount",
            "--uts",
            "--root",
            "--wd",
            "--",
            *argv,
        ]

    def run_in_pod(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 30.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `argv` inside the pod's network, mount and UTS namespaces and root, with the
        pod's environment unless `env` is given; wait for it (bounded by `timeout`)."""
        return subprocess.run(
            self._enter_argv(argv),
            input=input,
            capture_output=True,
            timeout=timeout,
            check=check,
            env=dict(env) if env is not None else self.env,
        )

    def popen_in_pod(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside the pod (like `run_in_pod`) without waiting. Its `.pid` is the
        real process's; `close()` kills it if it still runs."""
        proc = subprocess.Popen(
            self._enter_argv(argv),
            env=dict(env) if env is not None else self.env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )
        self._children.append(proc)
        return proc

    def close(self) -> None:
        """Kill the pod's processes, delete its netns and veth pair and its work directory."""
        if self._closed:
            return
        self._closed = True
        for proc in [*self._children, *([self._proc] if self._proc else [])]:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        _remove_netns(self.netns)
        _run(["ip", "link", "del", self.host_if], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _remove_netns(name: str) -> None:
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)


def create_pod(spec: PodSpec | None = None) -> LocalPod:
    """Create and start a local pod; on any failure everything created so far is removed and
    PodError says what failed. Needs root."""
    pod = LocalPod(spec or PodSpec(), next(_counter))
    try:
        pod._setup_network()
        pod._start()
    except BaseException:
        pod.close()
        raise
    return pod


def cleanup_leftovers() -> list[str]:
    """Remove pods (netns, veth ends, work directories) whose creating process is dead.
    Returns the names removed."""
    removed: list[str] = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NETNS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _remove_netns(name)
            removed.append(name)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for m in re.finditer(r"^\d+: ([^:@\s]+)", links, re.MULTILINE):
        lm = _LINK_RE.match(m.group(1))
        if lm and not _pid_alive(int(lm.group(1))):
            _run(["ip", "link", "del", m.group(1)], check=False)
            removed.append(m.group(1))
    tmp = Path(tempfile.gettempdir())
    for entry in tmp.iterdir():
        wm = _WORKDIR_RE.match(entry.name)
        if wm and entry.is_dir() and not _pid_alive(int(wm.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed
