"""mirrord for Python: run a local process as if it ran inside a Kubernetes pod."""

from __future__ import annotations

from mirrord._version import __version__

__all__ = ["__version__"]
