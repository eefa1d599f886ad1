"""The IntelliJ plugin's glue (extensions/intellij/plugin) against its core, as far as this
machine allows: the IntelliJ Platform's jars cannot be had here, so `plugin/` cannot compile,
but kotlinc over core's and the glue's sources together still shows that the glue has no syntax
error and that every core or glue name it uses exists (a type, a top-level function, or a member
named through such an object or type, such as `SessionEnvironment.changes`): a rename in core that
the glue missed fails here. Everything else kotlinc reports is the platform's classes missing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.ide.test_intellij_core import TEST_CORE

pytestmark = [pytest.mark.slow]

ROOT = TEST_CORE.parent.parent
CORE = ROOT / "core" / "src" / "main" / "kotlin"
PLUGIN = ROOT / "plugin" / "src" / "main" / "kotlin"
GSON = "/usr/share/java/gson.jar"

ERROR = re.compile(r"^(?P<file>[^\s:]+\.kt):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")
SYNTAX = re.compile(r"expecting|unexpected|syntax error|unclosed|unresolved label", re.IGNORECASE)
DECLARED = re.compile(
    r"^(?:(?:data|sealed|enum|internal|private|const|fun|abstract|open)\s+)*"
    r"(?:class|object|interface|fun|val)\s+(?:<[^>]*>\s*)?([A-Za-z_]\w*)",
    re.MULTILINE,
)


def _declared_names(root: Path) -> set[str]:
    """Types and top-level functions/constants (declared at column 0) and the types nested one
    level in (ProgressMessage.Ready) of the sources under root."""
    names: set[str] = set()
    for source in root.rglob("*.kt"):
        text = source.read_text()
        names.update(DECLARED.findall(text))
        names.update(
            re.findall(r"^    (?:data |sealed |enum )?(?:class|object|interface) (\w+)", text, re.M)
        )
    return names


@pytest.mark.timeout(600)
def test_plugin_glue_uses_only_what_core_declares(tmp_path: Path) -> None:
    kotlinc = subprocess.run(
        [str(TEST_CORE), "--print-kotlinc"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout.strip()
    sources = sorted(str(p) for p in [*CORE.rglob("*.kt"), *PLUGIN.rglob("*.kt")])
    result = subprocess.run(
        [kotlinc, "-jvm-target", "17", "-cp", GSON, "-d", str(tmp_path / "out"), *sources],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    errors = [m for line in output.splitlines() if (m := ERROR.match(line))]
    # Without the platform the glue cannot compile: no error at all would mean this check
    # looked at nothing.
    assert result.returncode != 0 and errors, output[-3000:]
    in_core = [
        m.group(0) for m in errors if Path(m["file"]).resolve().is_relative_to(CORE.resolve())
    ]
    assert in_core == [], "core must compile on its own:\n" + "\n".join(in_core)
    syntax = [m.group(0) for m in errors if SYNTAX.search(m["msg"])]
    assert syntax == [], "\n".join(syntax)
    # Core's names, and the glue's own: an unresolved one is a mistake, not the platform missing.
    known = _declared_names(CORE) | _declared_names(PLUGIN)
    wrong = []
    for m in errors:
        name = re.fullmatch(r"unresolved reference '(\w+)'\.?", m["msg"])
        if name is None:
            continue
        line = (ROOT / m["file"]).read_text().splitlines()[int(m["line"]) - 1]
        receiver = re.search(r"(\w+)\s*\.\s*$", line[: int(m["col"]) - 1])
        if name[1] in known or (receiver is not None and receiver[1] in known):
            wrong.append(m.group(0))
    assert wrong == [], "the glue uses names that core or the glue do not declare:\n" + "\n".join(
        wrong
    )
