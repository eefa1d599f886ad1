"""mirrord's progress protocol: what IDE extensions read from `mirrord ext` and `mirrord ls`.

Owns: `MIRRORD_PROGRESS_MODE` (`json`, `simple`/`dumb`, `std`/`standard`, `off`), the progress
messages in mirrord's JSON shapes (one compact object per line, keys in mirrord's order):

    {"type":"NewTask","name":...,"parent":...|null}
    {"type":"FinishedTask","name":...,"success":true|false,"message":...|null}
    {"type":"Warning","message":...}
    {"type":"Info","message":...}
    {"type":"IdeMessage","message":{"id":...,"level":"Info"|"Warning","text":...,"actions":[...]}}

(`IdeMessage` only with `MIRRORD_PROGRESS_SUPPORT_IDE=true`, exactly as mirrord parses it), and
the error line `Error: {"message","severity","causes","help","labels","related"}` that both of
mirrord's IDE extensions parse from stderr (VS Code with the regex `/Error: (.*)/`, so the object
stays on one line; IntelliJ by removing the `Error: ` prefix from the whole of stderr, so nothing
else may be written there).
Does not own what the commands report (they call this), nor the human progress of `mirrord run`
(`_sessions.Progress`, which asks `progress_mode` which display to use).
It imports nothing beyond the standard library: `mirrord run`'s fast path uses it.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TextIO

__all__ = [
    "READY_TASK",
    "JsonProgress",
    "ProgressMode",
    "error_object",
    "ide_name",
    "ide_support",
    "progress_mode",
    "write_error",
]

# The root task of `mirrord ext`; its successful FinishedTask carries the execution (the IDEs
# look for this exact name).
READY_TASK = "mirrord preparing to launch"


class ProgressMode(enum.Enum):
    JSON = "json"
    SIMPLE = "simple"  # plain lines, no spinner
    STD = "std"  # a spinner on a terminal
    OFF = "off"


_MODES = {
    "json": ProgressMode.JSON,
    "simple": ProgressMode.SIMPLE,
    "dumb": ProgressMode.SIMPLE,
    "std": ProgressMode.STD,
    "standard": ProgressMode.STD,
    "off": ProgressMode.OFF,
}


def progress_mode(environ: Mapping[str, str] | None = None) -> ProgressMode | None:
    """`MIRRORD_PROGRESS_MODE`, or None when unset or not one of mirrord's values (then each
    command uses its own default, as mirrord does)."""
    env = os.environ if environ is None else environ
    return _MODES.get(env.get("MIRRORD_PROGRESS_MODE", ""))


def ide_support(environ: Mapping[str, str] | None = None) -> bool:
    """`MIRRORD_PROGRESS_SUPPORT_IDE=true` (mirrord parses it as a Rust bool: `true` only)."""
    env = os.environ if environ is None else environ
    return env.get("MIRRORD_PROGRESS_SUPPORT_IDE") == "true"


def ide_name(environ: Mapping[str, str] | None = None) -> str:
    """`MIRRORD_IDE_NAME` (`vscode`, `intellij`), `plugin` when unset, as mirrord names it."""
    env = os.environ if environ is None else environ
    return env.get("MIRRORD_IDE_NAME") or "plugin"


def _line(obj: Mapping[str, Any]) -> str:
    # compact, like serde_json::to_string; ensure_ascii keeps every line one line whatever
    # the text holds
    return json.dumps(obj, separators=(",", ":")) + "\n"


class JsonProgress:
    """mirrord's JSON progress messages, one per line, written and flushed at once (the IDE
    acts on each line as it arrives)."""

    def __init__(self, stream: TextIO | None = None, environ: Mapping[str, str] | None = None):
        self._stream = stream
        self._ide = ide_support(environ)
        # events arrive on the control connection's reader thread too: whole lines only
        self._lock = threading.Lock()

    def _write(self, obj: Mapping[str, Any]) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            stream.write(_line(obj))
            stream.flush()

    def new_task(self, name: str, parent: str | None = None) -> None:
        self._write({"type": "NewTask", "name": name, "parent": parent})

    def finished_task(self, name: str, *, success: bool, message: str | None = None) -> None:
        self._write({"type": "FinishedTask", "name": name, "success": success, "message": message})

    def warning(self, message: str) -> None:
        self._write({"type": "Warning", "message": message})

    def info(self, message: str) -> None:
        self._write({"type": "Info", "message": message})

    def ide_message(
        self,
        *,
        id: str,
        level: Literal["Info", "Warning"],
        text: str,
        links: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """An `IdeMessage` (a notification with `Link` actions as (label, url)); written only
        when the IDE said it supports them. Returns whether it was written."""
        if not self._ide:
            return False
        actions = [{"kind": "Link", "label": label, "link": link} for label, link in links]
        message = {"id": id, "level": level, "text": text, "actions": actions}
        self._write({"type": "IdeMessage", "message": message})
        return True


def error_object(message: str, *, help: str = "", causes: Sequence[str] = ()) -> dict[str, Any]:
    """The error object mirrord prints after `Error: ` (miette's JSON report: these six fields
    are the ones the IDEs read)."""
    return {
        "message": message,
        "severity": "error",
        "causes": list(causes),
        "help": help,
        "labels": [],
        "related": [],
    }


def write_error(
    message: str, *, help: str = "", causes: Sequence[str] = (), stream: TextIO | None = None
) -> None:
    """`Error: {...}` as one line on stderr."""
    out = stream if stream is not None else sys.stderr
    out.write("Error: " + _line(error_object(message, help=help, causes=causes)))
    out.flush()
