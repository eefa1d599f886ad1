"""Agent backends as the daemon uses them: which one serves a target, and the local one.

Owns: the choice of backend for a target string (`select_backend`, `backends_for_daemon`),
what a session's target needs before any agent starts (`check_session_target`), and the
*local* backend (an `mirrord-agent` subprocess for `pid/N` and `container/ID` targets on this
machine, reached through a unix socket in the runtime directory). Does not own: the interface
every backend implements and its contract (`mirrord.backend`), the agent protocol spoken on the
stream (the daemon's agent pool does that with `mirrord.protocol.AgentConnection`), nor the
Kubernetes backend, which lives in `mirrord.kube`: the daemon's is
`mirrord.kube._helper_client.KubeHelperBackend`, which runs `mirrord.kube.KubeBackend` in a
helper process so that kubernetes_asyncio and aiohttp never load into the daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from mirrord.backend import AgentBackend, AgentHandle, Progress, kubeconfig_path
from mirrord.daemon._exceptions import (
    AgentStartError,
    NoTarget,
    RootRequired,
    TargetNotSupported,
)

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = [
    "AgentBackend",
    "AgentHandle",
    "LocalAgentBackend",
    "LocalAgentHandle",
    "Progress",
    "agent_environment",
    "backends_for_daemon",
    "check_session_target",
    "select_backend",
]

LOCAL_TARGET_PREFIXES = ("pid/", "container/")
DEFAULT_AGENT_IDLE_TIMEOUT = 60
log = logging.getLogger("mirrord.daemon")

_READY_PREFIX = "mirrord-agent ready "
_STANDBY_NICE = 10  # a standby agent's priority while it waits for its session
_ERROR_PREFIX = "mirrord-agent: error: "
_STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when stopping an agent


def agent_environment(config: MirrordConfig) -> dict[str, str]:
    """The agent options of the session's config as the agent reads them (its environment):
    `agent.nftables` -> MIRRORD_AGENT_NFTABLES, `agent.clean_iptables_on_start` ->
    MIRRORD_AGENT_CLEAN_IPTABLES_ON_START. Unset keys are left out (the agent detects).
    Sessions that share an agent share the options of the session that started it."""
    env: dict[str, str] = {}
    nftables = config.agent.nftables
    if nftables is not None:
        env["MIRRORD_AGENT_NFTABLES"] = "true" if nftables else "false"
    if config.agent.clean_iptables_on_start:
        env["MIRRORD_AGENT_CLEAN_IPTABLES_ON_START"] = "true"
    return env


def check_session_target(config: MirrordConfig, env: Mapping[str, str]) -> None:
    """What a session's target needs before any agent starts: no target at all (the default
    is targetless, in a cluster) needs a kubeconfig, or it gets `NoTarget`; a local target
    needs root (`RootRequired`). Cheap: no backend is loaded. `env` is the session's (HOME,
    KUBECONFIG)."""
    target = config.target.path
    if target is None:
        path = kubeconfig_path(config.kubeconfig, env)
        if not any(Path(p).is_file() for p in path.split(os.pathsep) if p):
            raise NoTarget(path.split(os.pathsep)[0])
    elif target.startswith(LOCAL_TARGET_PREFIXES) and os.geteuid() != 0:
        raise RootRequired(target)


def select_backend(target: str, backends: list[AgentBackend]) -> AgentBackend:
    """The first backend that handles `target`; `TargetNotSupported` if none does."""
    for backend in backends:
        if backend.handles(target):
            return backend
    raise TargetNotSupported(target, [b.name for b in backends])


def backends_for_daemon(runtime_dir: Path) -> list[AgentBackend]:
    """The daemon's backends: local first, then Kubernetes (its work runs in a helper process
    started the first time a target is not local: `mirrord.kube._helper_client`)."""
    from mirrord.kube import KubeHelperBackend

    return [LocalAgentBackend(runtime_dir), KubeHelperBackend()]


# ------------------------------------------------------------------------- local backend


class LocalAgentHandle:
    """A `mirrord-agent` subprocess of the daemon, listening on a unix socket."""

    def __init__(
        self,
        *,
        target: str,
        process: anyio.abc.Process,
        socket_path: Path,
        secret_path: Path,
        log_path: Path,
        secret: str,
        fingerprint: str = "",
    ) -> None:
        self.key = f"local:{target}" + (f"@{fingerprint}" if fingerprint else "")
        self.target = target
        self.description = f"local agent pid {process.pid} for {target}"
        self.secret = secret
        self.process = process
        self.socket_path = socket_path
        self.secret_path = secret_path
        self.log_path = log_path
        self._stopped = False

    def __repr__(self) -> str:  # no secret here
        return f"<LocalAgentHandle {self.key} pid={self.process.pid} alive={self.alive()}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return not self._stopped and self.process.returncode is None

    async def connect(self) -> anyio.abc.ByteStream:
        if not self.alive():
            raise AgentStartError(
                f"the agent for {self.target} has exited ({self.process.returncode}); "
                f"its log is {self.log_path}"
            )
        try:
            with anyio.fail_after(5):
                return await anyio.connect_unix(str(self.socket_path))
        except (OSError, TimeoutError) as exc:
            raise AgentStartError(
                f"cannot connect to the agent for {self.target} at {self.socket_path}: {exc}; "
                f"its log is {self.log_path}"
            ) from exc

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                try:
                    self.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                with anyio.move_on_after(_STOP_GRACE):
                    await self.process.wait()
                if self.process.returncode is None:
                    try:
                        self.process.kill()
                    except ProcessLookupError:
                        pass
                    with anyio.move_on_after(_STOP_GRACE):
                        await self.process.wait()
            await self.process.aclose()
            # a log is kept only when the agent did not end the way we asked it to
            clean = self.process.returncode in (0, -signal.SIGTERM)
            paths = (self.socket_path, self.secret_path, *((self.log_path,) if clean else ()))
            for path in paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass


@dataclass
class _Spawned:
    """An agent process just spawned (`LocalAgentBackend._spawn`), not ready yet."""

    process: anyio.abc.Process
    socket_path: Path
    secret_path: Path
    log_path: Path
    secret: str
    ready_fd: int  # the read end of its --ready-fd pipe (the backend closes it)

    def handle(self, target: str, fingerprint: str = "") -> LocalAgentHandle:
        return LocalAgentHandle(
            target=target,
            process=self.process,
            socket_path=self.socket_path,
            secret_path=self.secret_path,
            log_path=self.log_path,
            secret=self.secret,
            fingerprint=fingerprint,
        )


class LocalAgentBackend:
    """Spawns `mirrord-agent` (docs/agent.md) as a root subprocess for `pid/N` and `container/ID`.

    The agent's socket, secret file and log live in the runtime directory. Its stdout and
    stderr go to the log file (never a pipe: a pipe nobody drains would block the agent); its
    ready line also comes through a pipe of its own (`--ready-fd`), and a failure is read from
    the log. With `start_standby` the first session's agent is started ahead, before the
    session's settings are known, and the session takes it. Under `setpriv --pdeathsig TERM`
    the agent is told to exit when the daemon dies, so a killed daemon never leaves agents
    behind for long.
    """

    name = "local"

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self._counter = 0
        # start_standby's (target, agent), until a session takes it
        self._standby: tuple[str, _Spawned] | None = None
        self._standby_spawning: anyio.Event | None = None  # set once start_standby spawned
        self._standby_over = False  # no standby any more: the first session came, or the end

    def __repr__(self) -> str:
        return f"<LocalAgentBackend runtime_dir={self.runtime_dir}>"

    def handles(self, target: str) -> bool:
        return target.startswith(LOCAL_TARGET_PREFIXES)

    def agent_fingerprint(self, config: MirrordConfig) -> str:
        """The settings a local agent runs with (its environment from `agent_environment` and
        `agent.communication_timeout`): the pool reuses a lingering agent only for a session
        asking for the same. "" for the defaults."""
        env = agent_environment(config)
        idle = config.agent.communication_timeout
        if not env and idle in (None, DEFAULT_AGENT_IDLE_TIMEOUT):
            return ""
        text = json.dumps({"env": env, "idle": idle}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def _command(self, options: list[str], socket_path: Path, secret_path: Path) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "mirrord.agent",
            *options,
            "--listen",
            f"unix:{socket_path}",
            "--secret-file",
            str(secret_path),
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        return argv

    async def _spawn(
        self, options: list[str], env: Mapping[str, str], stdin: int | None
    ) -> _Spawned:
        """An agent process with its socket, secret file, log and ready pipe (docs/agent.md):
        `options` are its target options (or `--standby`), `stdin` None or PIPE."""
        self._counter += 1
        stem = f"agent-{os.getpid()}-{self._counter}"
        socket_path = self.runtime_dir / f"{stem}.sock"
        secret_path = self.runtime_dir / f"{stem}.secret"
        log_path = self.runtime_dir / f"{stem}.log"
        secret = secrets.token_urlsafe(32)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        # the agent writes its ready line into this pipe too and closes it: readiness (or the
        # agent's end) is seen at once, not at the next look at its log
        ready_r, ready_w = os.pipe()
        try:
            process = await anyio.open_process(
                self._command([*options, "--ready-fd", str(ready_w)], socket_path, secret_path),
                env={**os.environ, **env},
                stdin=stdin,
                stdout=log,
                stderr=log,
                pass_fds=(ready_w,),
                start_new_session=True,  # a Ctrl-C in the user's terminal is not for the agent
            )
        except OSError as exc:
            os.close(ready_r)
            secret_path.unlink(missing_ok=True)
            raise AgentStartError(f"cannot start mirrord-agent: {exc}") from exc
        finally:
            log.close()
            os.close(ready_w)
        return _Spawned(process, socket_path, secret_path, log_path, secret, ready_r)

    async def start_standby(self, target: str) -> None:
        """Start the agent for `target` ahead of its session: it loads its code, then waits on
        stdin for the session's settings (`mirrord-agent --standby`), and the session finds it
        loaded. `mirrord run` asks for it when it starts the daemon for a local target
        (`mirrordd --standby-agent TARGET`). Best effort: a failure leaves the usual start."""
        if os.geteuid() != 0 or self._standby is not None or self._standby_over:
            return
        if not self.handles(target):
            return
        self._standby_spawning = spawning = anyio.Event()
        try:
            # shielded: a process spawned is always one this backend knows (and stops)
            with anyio.CancelScope(shield=True):
                options = ["--target", target, "--standby"]
                spawned = await self._spawn(options, {}, subprocess.PIPE)
        except AgentStartError as exc:
            log.info("no standby agent: %s", exc)
            return
        finally:
            spawning.set()
        if self._standby_over:  # the first session ended meanwhile, or the daemon stopped
            await self._stop_unused(spawned)
            return
        # It loads its code while this daemon and the command that started it get ready, on
        # the same cores: at a lower priority, so that it takes what they leave.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, spawned.process.pid, _STANDBY_NICE)
        self._standby = (target, spawned)

    @property
    def standby(self) -> dict[str, Any] | None:
        """The standby agent no session took yet, for `mirrord daemon status`: its target and
        pid; None when there is none."""
        if self._standby is None:
            return None
        target, spawned = self._standby
        return {"target": target, "pid": spawned.process.pid}

    async def _stop_unused(self, standby: _Spawned) -> None:
        """A standby agent no session takes: its stdin's end (it exits), then as any agent."""
        if standby.process.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await standby.process.stdin.aclose()
        await standby.handle("standby").stop()
        os.close(standby.ready_fd)

    async def _take_standby(self, target: str, env: Mapping[str, str]) -> _Spawned | None:
        """The standby agent (waited for while it is being spawned), if it is for `target` and
        the session asks for no agent options (`env`: those go into an agent's environment
        when it is exec'd). One that is not (the session's target came from its config file)
        stops. One that has died is returned all the same: its end is the session's error, as
        any agent's end during its start."""
        taken = await self._pop_standby()
        if taken is None:
            return None
        standby_target, standby = taken
        if standby_target != target or env:
            await self._stop_unused(standby)
            return None
        return standby

    async def _pop_standby(self) -> tuple[str, _Spawned] | None:
        """The standby agent and its target, no longer the backend's (waited for while it is
        being spawned); None when there is none."""
        if self._standby_spawning is not None:
            await self._standby_spawning.wait()
        standby, self._standby = self._standby, None
        return standby

    async def drop_standby(self) -> None:
        """The daemon's first session was created, or refused: a standby agent it did not take
        stops (one still being spawned stops once it is)."""
        self._standby_over = True
        standby = await self._pop_standby()
        if standby is not None:
            await self._stop_unused(standby[1])

    async def aclose(self) -> None:
        """The daemon stops: an unused standby agent goes too."""
        await self.drop_standby()

    async def start_agent(
        self, target: str, config: MirrordConfig, progress: Progress
    ) -> LocalAgentHandle:
        if not self.handles(target):
            raise TargetNotSupported(target, [self.name])
        kind, _, ident = target.partition("/")
        if not ident or (kind == "pid" and not ident.isdigit()):
            raise AgentStartError(
                f"target {target!r} is not valid: use pid/N (a process id) or container/ID"
            )
        if os.geteuid() != 0:
            raise RootRequired(target)
        startup_timeout = float(config.agent.startup_timeout)
        idle = config.agent.communication_timeout
        if idle is None:
            idle = DEFAULT_AGENT_IDLE_TIMEOUT
        progress(f"starting agent for {target}")
        env = agent_environment(config)
        spawned = await self._take_standby(target, env)
        if spawned is not None:
            told = await self._tell(spawned, idle)
        else:
            options = ["--target", target, "--idle-timeout", str(idle)]
            spawned, told = await self._spawn(options, env, None), True
        handle = spawned.handle(target, self.agent_fingerprint(config))
        try:
            if not told:  # the standby is gone
                raise AgentStartError(await self._failure(handle))
            await self._wait_ready(handle, startup_timeout, spawned.ready_fd)
        except BaseException:
            await handle.stop()
            raise
        finally:
            os.close(spawned.ready_fd)
        progress(f"agent ready for {target} (pid {handle.pid})")
        return handle

    async def _tell(self, standby: _Spawned, idle: int) -> bool:
        """Tell `standby` the session's settings: one JSON line on its stdin, then the stdin's
        end. False when it cannot be told (it is gone)."""
        if standby.process.stdin is None:
            return False
        line = json.dumps({"idle_timeout": idle}) + "\n"
        with contextlib.suppress(OSError):  # a session waits for it now (before its threads)
            os.setpriority(os.PRIO_PROCESS, standby.process.pid, 0)
        try:
            await standby.process.stdin.send(line.encode())
            await standby.process.stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def _wait_ready(self, handle: LocalAgentHandle, timeout: float, ready_fd: int) -> None:
        """Wait up to `timeout` seconds for the agent's ready line (docs/agent.md) on the pipe
        it got as --ready-fd. The pipe's end without it, or the agent's exit, is a failure,
        told from its log."""
        os.set_blocking(ready_fd, False)
        got = b""
        with anyio.move_on_after(timeout):
            while True:
                # the agent's exit is looked at every 50 ms as well: a process it forked before
                # its end may still hold the pipe open
                with anyio.move_on_after(0.05):
                    await anyio.wait_readable(ready_fd)
                try:
                    chunk = os.read(ready_fd, 4096)
                except BlockingIOError:
                    chunk = None
                if chunk:
                    got += chunk
                    if any(line.startswith(_READY_PREFIX.encode()) for line in got.splitlines()):
                        return
                    continue
                if chunk == b"" or handle.process.returncode is not None:
                    raise AgentStartError(await self._failure(handle))
        text = await anyio.to_thread.run_sync(_read_text, handle.log_path)
        raise AgentStartError(
            f"the agent for {handle.target} did not report ready within {timeout:g} s "
            f"(config agent.startup_timeout); its log is {handle.log_path}"
            + (f"; last lines: {_tail(text)}" if text.strip() else "")
        )

    async def _failure(self, handle: LocalAgentHandle) -> str:
        """What went wrong with an agent that closed its ready pipe, or exited, before it was
        ready: its exit (waited for a moment) and the last error line of its log."""
        with anyio.move_on_after(2):
            await handle.process.wait()
        text = await anyio.to_thread.run_sync(_read_text, handle.log_path)
        if handle.process.returncode is None:
            return (
                f"the agent for {handle.target} closed its ready pipe without reporting ready; "
                f"its log is {handle.log_path}" + (f"; last lines: {_tail(text)}" if text else "")
            )
        return _agent_failure(handle, text)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes()[-65536:].decode(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _agent_failure(handle: LocalAgentHandle, text: str) -> str:
    errors = [
        line[len(_ERROR_PREFIX) :].strip()
        for line in text.splitlines()
        if line.startswith(_ERROR_PREFIX)
    ]
    code = handle.process.returncode
    if errors:
        return f"the agent for {handle.target} failed: {errors[-1]}"
    if code == 3:
        return f"target {handle.target} was not found (or is gone): check the pid / container id"
    detail = f"; last lines: {_tail(text)}" if text.strip() else ""
    return (
        f"the agent for {handle.target} exited with status {code} before it was ready; "
        f"its log is {handle.log_path}{detail}"
    )
