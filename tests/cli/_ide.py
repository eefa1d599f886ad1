"""What mirrord's own IDE extensions do with the CLI's output, replayed step by step, so a test
fails where one of them would.

VS Code (`src/api.ts` of mirrord's extension): spawns the CLI with its environment plus
`MIRRORD_PROGRESS_MODE=json`, `MIRRORD_PROGRESS_SUPPORT_IDE=true`, `MIRRORD_IDE_NAME=vscode`,
`MIRRORD_LS_RICH_OUTPUT=true`; splits stdout on newlines and `JSON.parse`s every line (a line
that does not parse is an error; an empty line stops the loop); the ready line is the one with
`type == "FinishedTask"`, `name == "mirrord preparing to launch"` and `success`, whose
`message` it `JSON.parse`s again into `environment`, `patched_path`, `env_to_unset`,
`uses_operator`. On exit it matches stderr against `/Error: (.*)/` and `JSON.parse`s the group,
showing `message` and offering `help`. For `ls`/`verify-config` it parses the whole stdout.
IntelliJ (`MirrordApi.kt`): the same environment with `MIRRORD_IDE_NAME=intellij` and
`MIRRORD_EXT_PRINT_CONFIG=TRUE`; Gson-parses every stdout line into
`{type, name, parent, success, message}` (`type` one of the five kinds), and on a non-zero
exit parses the whole of stderr after removing the prefix `Error: ` into
`{message, severity, causes, help, labels, related}`. `ls` runs as `ls -f CFG -o json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IDE_ENV",
    "READY",
    "Execution",
    "check_message",
    "debuggee_env",
    "intellij_error",
    "read_until_ready",
    "vscode_error",
]

READY = "mirrord preparing to launch"
KINDS = {"NewTask", "FinishedTask", "Warning", "Info", "IdeMessage"}

IDE_ENV = {
    "vscode": {
        "MIRRORD_PROGRESS_MODE": "json",
        "MIRRORD_PROGRESS_SUPPORT_IDE": "true",
        "MIRRORD_IDE_NAME": "vscode",
        "MIRRORD_LS_RICH_OUTPUT": "true",
    },
    "intellij": {
        "MIRRORD_PROGRESS_MODE": "json",
        "MIRRORD_PROGRESS_SUPPORT_IDE": "true",
        "MIRRORD_IDE_NAME": "intellij",
        "MIRRORD_EXT_PRINT_CONFIG": "TRUE",
    },
}


@dataclass
class Execution:
    """The decoded ready line, and every message before it."""

    environment: dict[str, str]
    patched_path: str | None
    env_to_unset: list[str]
    uses_operator: bool
    messages: list[dict[str, Any]] = field(default_factory=list)


def check_message(message: Any) -> dict[str, Any]:
    """One progress message as both extensions read it: an object whose `type` is one of the
    five kinds, with the fields of that kind."""
    assert isinstance(message, dict), message
    kind = message.get("type")
    assert kind in KINDS, message
    if kind == "NewTask":
        assert list(message) == ["type", "name", "parent"], message
        assert isinstance(message["name"], str) and message["name"], message
        assert message["parent"] is None or isinstance(message["parent"], str), message
    elif kind == "FinishedTask":
        assert list(message) == ["type", "name", "success", "message"], message
        assert isinstance(message["success"], bool), message
        assert message["message"] is None or isinstance(message["message"], str), message
    elif kind in ("Warning", "Info"):
        assert list(message) == ["type", "message"], message
        # VS Code shows `message` as is: an object would show nothing at all
        assert isinstance(message["message"], str) and message["message"], message
    else:
        ide = message["message"]
        assert set(ide) == {"id", "level", "text", "actions"}, message
        assert ide["level"] in ("Info", "Warning") and isinstance(ide["text"], str), message
        for action in ide["actions"]:
            assert action["kind"] == "Link" and {"label", "link"} <= set(action), message
    return message


def read_until_ready(lines: Iterable[str]) -> Execution:
    """Read `mirrord ext`'s stdout line by line until the ready line, as the IDEs do."""
    seen: list[dict[str, Any]] = []
    for raw in lines:
        line = raw.rstrip("\n")
        assert line, f"an empty line stops VS Code's reader (after {seen})"
        message = check_message(json.loads(line))  # a line that does not parse is an error
        seen.append(message)
        if message["type"] == "FinishedTask" and message["name"] == READY:
            assert message["success"], seen
            execution = json.loads(message["message"])  # a JSON string inside the JSON
            assert list(execution) == [
                "environment",
                "patched_path",
                "env_to_unset",
                "uses_operator",
            ], execution
            assert all(
                isinstance(k, str) and isinstance(v, str)
                for k, v in execution["environment"].items()
            )
            return Execution(
                environment=execution["environment"],
                patched_path=execution["patched_path"],
                env_to_unset=execution["env_to_unset"],
                uses_operator=execution["uses_operator"],
                messages=seen,
            )
    raise AssertionError(f"stdout ended without the ready line: {seen}")


def debuggee_env(base: Mapping[str, str], execution: Execution) -> dict[str, str]:
    """What VS Code gives its debuggee: the launch configuration's env with `environment`
    assigned over it, then `env_to_unset` deleted."""
    env = dict(base)
    env.update(execution.environment)
    for key in execution.env_to_unset:
        env.pop(key, None)
    return env


_SIX = ["message", "severity", "causes", "help", "labels", "related"]


def vscode_error(stderr: str) -> dict[str, Any]:
    """VS Code: the first `Error: (.*)` match of stderr, parsed."""
    match = re.search(r"Error: (.*)", stderr)
    assert match is not None, stderr
    error = json.loads(match.group(1))
    assert isinstance(error, dict) and isinstance(error["message"], str), error
    return error


def intellij_error(stderr: str) -> dict[str, Any]:
    """IntelliJ: all of stderr without the `Error: ` prefix, parsed into the six fields."""
    text = stderr.removeprefix("Error: ")
    error = json.loads(text)  # anything else on stderr and this fails
    assert isinstance(error, dict) and all(k in error for k in _SIX), error
    assert isinstance(error["causes"], list) and isinstance(error["help"], str), error
    assert isinstance(error["labels"], list) and isinstance(error["related"], list), error
    return error
