"""Errors of the config package.

Owns: `ConfigError`, the one exception that loading or validating a configuration raises.
Does not own: printing it (the CLI does that) or deciding exit codes.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """The configuration cannot be used: a file is missing or unreadable, it does not parse, a
    template refers to an unset variable, or a value is wrong.

    `errors` holds one line per problem; each names where it came from (file or environment
    variable), the key path (e.g. `feature.network.incoming.mode`), the bad value and what is
    allowed. This is the user's setup, not our bug: the caller shows the lines and stops; the
    user fixes the file (and can check it with `mirrord verify-config PATH`).
    """

    def __init__(self, errors: list[str], *, source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(
            f"invalid mirrord configuration{where}:\n{lines}\n"
            "Fix the value(s) above; `mirrord verify-config PATH` checks a file."
        )
