"""The daemon harness (a real daemon on a temporary runtime directory, with a scripted agent)
for every test module here; it is defined next to the tests of the daemon's logic."""

from __future__ import annotations

from tests.daemon.test_daemon_logic import harness

__all__ = ["harness"]
