"""The target's environment: `/proc/PID/environ`, filtered by glob lists.

Owns: reading and filtering. Values are secrets: nothing here logs them, and `EnvReply` hides
them in its repr. `/proc/PID/environ` is the environment the target was started with; later
`setenv` calls inside the target are not visible (nor are they in Kubernetes' view).
Does not own: the include/exclude conflict rule (the config rejects both at once; given both,
the agent applies include, then exclude).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

__all__ = ["filter_env", "read_environ"]


def read_environ(pid: int) -> dict[str, str]:
    """The initial environment of `pid` (blocking). Raises OSError."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if not sep or not name:
            continue
        # The wire carries text; bytes that are not UTF-8 become U+FFFD rather than failing.
        env[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def filter_env(
    env: dict[str, str], include: Sequence[str], exclude: Sequence[str]
) -> dict[str, str]:
    """Keep names matching any `include` glob (all when empty), then drop names matching any
    `exclude` glob. Globs are case-sensitive (`fnmatchcase`), like env names."""
    out = {
        k: v
        for k, v in env.items()
        if not include or any(fnmatch.fnmatchcase(k, pat) for pat in include)
    }
    return {k: v for k, v in out.items() if not any(fnmatch.fnmatchcase(k, p) for p in exclude)}
