"""The agent pool: one agent (handle + one agent stream) per target key, shared by sessions.

Owns: starting agents through backends, sharing them by handle key, reconnecting a stream to
an agent that is still alive, keeping an agent with no sessions warm for its linger time and
then stopping it. Does not own what is spoken on the stream (`AgentLink`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from mirrord.backend import AgentBackend, AgentHandle, Progress
from mirrord.daemon._backend import select_backend
from mirrord.daemon._link import AgentLink

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = ["DEFAULT_LINGER", "AgentPool", "PoolEntry"]

log = logging.getLogger("mirrord.daemon.pool")

DEFAULT_LINGER = 60.0


def linger_of(config: MirrordConfig) -> float:
    """The `daemon.agent_linger` config value in seconds (how long an unused agent stays)."""
    return float(config.daemon.agent_linger)


class _Status(anyio.abc.TaskStatus[None]):
    """Forwards `started()` and remembers it, so a link that fails after it started is logged
    instead of ending the daemon's task group."""

    def __init__(self, started: Any) -> None:
        self._started = started

    def started(self, value: None = None) -> None:
        self._started(value)


class PoolEntry:
    """One agent in the pool."""

    def __init__(self, backend: AgentBackend, handle: AgentHandle) -> None:
        self.backend = backend
        self.handle = handle
        self.link: AgentLink | None = None
        self.sessions: set[str] = set()
        self.streams_opened = 0
        self.started = time.time()
        self.linger = DEFAULT_LINGER
        self.idle_since: float | None = None
        self._linger_scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<PoolEntry {self.handle.key} sessions={len(self.sessions)} link={self.link!r}>"

    def statistics(self) -> dict[str, Any]:
        pid = getattr(self.handle, "pid", None)
        return {
            "key": self.handle.key,
            "backend": self.backend.name,
            "description": self.handle.description,
            "pid": pid,
            "alive": self.handle.alive(),
            "started": self.started,
            "sessions": sorted(self.sessions),
            "streams_opened": self.streams_opened,
            "link": self.link.statistics() if self.link is not None else None,
            "linger": self.linger,
            "idle_since": self.idle_since,
        }


class AgentPool:
    def __init__(self, backends: list[AgentBackend], tg: anyio.abc.TaskGroup) -> None:
        self.backends = backends
        self.entries: dict[str, PoolEntry] = {}
        self._tg = tg
        self._target_keys: dict[tuple[str, str, str], str] = {}
        self._locks: dict[tuple[str, str, str], anyio.Lock] = {}

    def __repr__(self) -> str:
        return f"<AgentPool agents={len(self.entries)}>"

    async def acquire(
        self, target: str, config: MirrordConfig, progress: Progress, session_id: str
    ) -> AgentLink:
        """The open link to the agent for `target`, starting the agent if needed; the session
        is counted as a user of it until `release()`."""
        backend = select_backend(target, self.backends)
        # A lingering agent serves a new session only if it was started with the settings
        # this one asks for: a backend that tells them apart gives their fingerprint.
        fingerprint = getattr(backend, "agent_fingerprint", None)
        lock_key = (backend.name, target, fingerprint(config) if fingerprint is not None else "")
        lock = self._locks.setdefault(lock_key, anyio.Lock())
        async with lock:
            entry = self._reusable(lock_key)
            if entry is None:
                if self._differs_only_in_settings(lock_key):
                    progress(f"the agent for {target} runs with other agent settings: another one")
                handle = await backend.start_agent(target, config, progress)
                self._target_keys[lock_key] = handle.key
                existing = self.entries.get(handle.key)
                if existing is not None and existing.handle.alive():
                    await handle.stop()  # another target string resolved to the same agent
                    entry = existing
                else:
                    entry = PoolEntry(backend, handle)
                    self.entries[handle.key] = entry
            else:
                progress(f"reusing agent {entry.handle.description}")
            entry.linger = linger_of(config)
            if entry.link is None or not entry.link.is_open:
                try:
                    await self._connect(entry, progress)
                except BaseException:
                    if not entry.sessions:
                        await self._stop(entry)
                    raise
            self._cancel_linger(entry)
            entry.sessions.add(session_id)
            assert entry.link is not None
            return entry.link

    def _differs_only_in_settings(self, lock_key: tuple[str, str, str]) -> bool:
        """Whether a live agent serves the same target with other agent settings."""
        for (name, target, settings), key in self._target_keys.items():
            if (name, target) == lock_key[:2] and settings != lock_key[2]:
                entry = self.entries.get(key)
                if entry is not None and entry.handle.alive():
                    return True
        return False

    def _reusable(self, lock_key: tuple[str, str, str]) -> PoolEntry | None:
        key = self._target_keys.get(lock_key)
        entry = self.entries.get(key) if key is not None else None
        if entry is None:
            return None
        if not entry.handle.alive():
            self.entries.pop(entry.handle.key, None)
            self._tg.start_soon(entry.handle.stop)
            return None
        return entry

    async def _connect(self, entry: PoolEntry, progress: Progress) -> None:
        progress(f"connecting to {entry.handle.description}")
        link = AgentLink(entry.handle)
        await self._tg.start(self._run_link, entry, link)
        entry.streams_opened += 1
        entry.link = link

    async def _run_link(
        self,
        entry: PoolEntry,
        link: AgentLink,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False

        def mark_started(value: None = None) -> None:
            nonlocal started
            started = True
            task_status.started(value)

        status = _Status(mark_started)
        try:
            await link.run(task_status=status)
        except Exception:
            if not started:
                raise  # the caller of start() gets the error (could not connect)
            log.exception("agent link %s failed", entry.handle.key)
        # The stream ended. Sessions on it were told (agent lost). An agent that is gone is
        # removed; one that is alive stays for new sessions (a new stream) or its linger.
        if not entry.handle.alive() and self.entries.get(entry.handle.key) is entry:
            del self.entries[entry.handle.key]
            await entry.handle.stop()

    async def watch(self, interval: float = 1.0) -> None:
        """Drop agents that died (killed, crashed, their pod gone) within `interval` seconds,
        whether or not a stream to them was open: `daemon status` lists only live agents, and
        `stop()` removes what the backend kept for them (a local agent's socket and secret).
        The end of a stream alone cannot tell: the agent's exit may not be known yet then."""
        while True:
            await anyio.sleep(interval)
            for entry in [e for e in self.entries.values() if not e.handle.alive()]:
                log.warning(
                    "agent %s is gone (%s): dropped", entry.handle.key, entry.handle.description
                )
                await self._stop(entry)

    def release(self, link: AgentLink, session_id: str) -> None:
        """The session no longer uses this agent; the agent lingers when nobody does."""
        entry = self.entries.get(link.handle.key)
        if entry is None:
            return
        entry.sessions.discard(session_id)
        if not entry.sessions:
            entry.idle_since = time.time()
            self._tg.start_soon(self._linger, entry)

    def _cancel_linger(self, entry: PoolEntry) -> None:
        entry.idle_since = None
        if entry._linger_scope is not None:
            entry._linger_scope.cancel()
            entry._linger_scope = None

    async def _linger(self, entry: PoolEntry) -> None:
        with anyio.CancelScope() as scope:
            if entry._linger_scope is not None:
                entry._linger_scope.cancel()
            entry._linger_scope = scope
            await anyio.sleep(entry.linger)
            if not entry.sessions and self.entries.get(entry.handle.key) is entry:
                log.info("agent %s unused for %gs: stopping it", entry.handle.key, entry.linger)
                await self._stop(entry)

    async def _stop(self, entry: PoolEntry) -> None:
        if self.entries.get(entry.handle.key) is entry:
            del self.entries[entry.handle.key]
        if entry.link is not None:
            entry.link.close()
        with anyio.CancelScope(shield=True):
            await entry.handle.stop()

    async def close_all(self) -> None:
        for entry in list(self.entries.values()):
            await self._stop(entry)
