"""Worker threads for the agent's blocking calls, each result handed back to the event loop.

Owns: a pool of threads that run blocking calls (file I/O under the target's root) off the
event loop, and calling a completion callback *on the event loop thread* with each result.
Does not own what the calls do (`_files.py`) or the replies (`_channel.py`).

Why not `anyio.to_thread.run_sync` in a task per request: a file request is a few
microseconds of work, and a task per request plus to_thread's machinery (capacity limiter,
cancel scopes, its own thread hand-off) cost about 150 µs per request in the agent (measured,
docs/performance.md). Here a request is one queue put and one wake-up of an idle thread; the
thread calls `done(ok, value)` back through the loop's thread-safe call-soon, where the channel
builds and writes the reply without spawning anything.

Threads start on demand while every thread is busy (a read on a FIFO may block one for ever,
and must not hold up the others), up to `max_threads`; beyond that jobs wait in the queue.
An idle thread ends after `idle_timeout`. `close()` lets idle threads end and never waits for a
blocked one (they are daemon threads).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["BlockingWorkers", "Done"]

log = logging.getLogger("mirrord.agent")

Done = Callable[[bool, Any], None]  # done(True, result) or done(False, exception)
_Job = tuple[Callable[[], Any], Done] | None  # None: a thread should end


class BlockingWorkers:
    def __init__(self, *, max_threads: int = 64, idle_timeout: float = 10.0) -> None:
        self.max_threads = max_threads
        self.idle_timeout = idle_timeout
        # event loop --job--> _jobs --> worker threads --done()--> event loop (call-soon)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # idle threads minus jobs queued for them (negative: a backlog)
        self._call_soon: Callable[..., Any] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<BlockingWorkers threads={self._threads} idle={self._idle}>"

    def bind(self) -> None:
        """Deliver results to the running event loop (trio or asyncio); call from it."""
        try:
            self._call_soon = trio.lowlevel.current_trio_token().run_sync_soon
        except RuntimeError:  # not in trio: under asyncio (imported here: the agent runs trio)
            import asyncio

            self._call_soon = asyncio.get_running_loop().call_soon_threadsafe

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        """Run `fn()` in a worker thread; `done` runs later on the event loop thread. Never
        waits; call from the event loop thread after `bind()`."""
        if self._call_soon is None or self._closed:
            raise RuntimeError("BlockingWorkers used before bind() or after close()")
        with self._lock:
            start = self._idle <= 0 and self._threads < self.max_threads
            if start:
                self._threads += 1
            else:
                self._idle -= 1
        if start:
            threading.Thread(
                target=self._work, args=((fn, done),), name="mirrord-agent-io", daemon=True
            ).start()
        else:
            self._jobs.put((fn, done))

    def close(self) -> None:
        """No more jobs; idle threads end now, busy ones after their job."""
        self._closed = True
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)

    def _work(self, job: _Job) -> None:
        while job is not None:
            fn, done = job
            try:
                result: tuple[bool, Any] = (True, fn())
            except BaseException as exc:  # delivered to the request that asked, not raised here
                result = (False, exc)
            call_soon = self._call_soon
            assert call_soon is not None
            try:
                call_soon(done, *result)
            except RuntimeError:
                pass  # the event loop has ended: nobody waits for this result
            del fn, done, result
            with self._lock:
                self._idle += 1
            job = self._next_job()
        with self._lock:
            self._threads -= 1

    def _next_job(self) -> _Job:
        while True:
            try:
                return self._jobs.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # no job is on its way to this thread: end it
                        self._idle -= 1
                        return None
