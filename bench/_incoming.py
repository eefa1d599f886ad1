"""Incoming-traffic figures (steal throughput and latency, mirror capacity)."""

from __future__ import annotations

from bench._core import NotAvailable, Result
from bench._env import BenchEnv

__all__ = ["mirror_capacity", "steal_latency", "steal_rps"]


def _require_incoming(env: BenchEnv) -> None:
    env.require_run()
    import importlib.util

    if importlib.util.find_spec("mirrord.agent._incoming") is None:
        raise NotAvailable("incoming traffic (mirror/steal) is not built yet")


def steal_rps(env: BenchEnv) -> Result:
    _require_incoming(env)
    raise NotAvailable("steal through `mirrord run` not wired yet")


def steal_latency(env: BenchEnv) -> Result:
    _require_incoming(env)
    raise NotAvailable("steal through `mirrord run` not wired yet")


def mirror_capacity(env: BenchEnv) -> Result:
    _require_incoming(env)
    raise NotAvailable("mirror through `mirrord run` not wired yet")
