"""The layer's C sources keep to the structure targets: no function over 80 lines.

A small C reader, not a compiler: comments, string and character literals and preprocessor
lines are blanked out, then braces are counted. A top-level `{` whose declaration has a
parameter list and no `=` opens a function; its length runs from the first line of the
declaration to the closing brace. Run as a script to list every function over the limit
(`python3 tests/test_native_structure.py [LIMIT]`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

NATIVE = Path(__file__).resolve().parent.parent / "native"
LIMIT = 80

# Functions over the limit that another change of the same refactor breaks up (issue 19): none
# left. Nothing may join this list.
PENDING: set[tuple[str, str]] = set()

_BLANKED = re.compile(
    r"""
      /\*.*?\*/                 # block comment
    | //[^\n]*                  # line comment
    | "(?:\\.|[^"\\\n])*"       # string literal
    | '(?:\\.|[^'\\\n])*'       # character literal
    | ^[ \t]*\#(?:[^\n]*\\\n)*[^\n]*  # preprocessor line, with its continuations
    """,
    re.VERBOSE | re.DOTALL | re.MULTILINE,
)
_CALLED = re.compile(r"([A-Za-z_][A-Za-z_0-9]*)\s*\($")  # the name before a "("
_NOT_NAMES = {"__attribute__", "__typeof__", "__declspec", "sizeof"}


@dataclass(frozen=True)
class Function:
    file: str
    name: str
    first_line: int
    lines: int


def _blank(match: re.Match[str]) -> str:
    # keep the newlines, so that line numbers still count
    return re.sub(r"[^\n]", " ", match.group(0))


def _name(declaration: str) -> str:
    depth = 0
    for i, ch in enumerate(declaration):
        if ch == "(":
            if depth == 0:
                head = _CALLED.search(declaration[: i + 1])
                if head is not None and head.group(1) not in _NOT_NAMES:
                    return head.group(1)
            depth += 1
        elif ch == ")":
            depth -= 1
    return "?"


def _is_function(declaration: str) -> bool:
    depth = 0
    has_params = False
    for ch in declaration:
        if ch == "(":
            depth += 1
            has_params = True
        elif ch == ")":
            depth -= 1
        elif ch == "=" and depth == 0:
            return False
    return has_params


def functions(path: Path, rel: str) -> list[Function]:
    """Every function defined in the C file at `path` (named `rel` in the result)."""
    text = _BLANKED.sub(_blank, path.read_text())
    found: list[Function] = []
    depth = 0
    line = 1
    decl_start: int | None = None  # offset of the current top-level declaration
    decl_line = 0
    opened: tuple[str, int] | None = None  # the function being read: name, first line
    for i, ch in enumerate(text):
        if ch == "\n":
            line += 1
            continue
        if depth == 0 and decl_start is None and not ch.isspace():
            decl_start, decl_line = i, line
        if ch == "{":
            if depth == 0 and decl_start is not None:
                declaration = text[decl_start:i]
                if _is_function(declaration):
                    opened = (_name(declaration), decl_line)
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and opened is not None:
                found.append(Function(rel, opened[0], opened[1], line - opened[1] + 1))
                opened = None
                decl_start = None
        elif ch == ";" and depth == 0:
            decl_start = None
    return found


def native_functions() -> list[Function]:
    """Every function of the layer and the supervisor sources."""
    result: list[Function] = []
    for path in sorted([*NATIVE.rglob("*.c"), *NATIVE.rglob("*.h")]):
        result.extend(functions(path, path.relative_to(NATIVE).as_posix()))
    return result


def _pending(fn: Function) -> bool:
    return (fn.file, "*") in PENDING or (fn.file, fn.name) in PENDING


def test_the_reader_finds_functions_and_their_lengths(tmp_path: Path) -> None:
    source = tmp_path / "sample.c"
    source.write_text(
        "/* a { comment */\n"
        "#define BRACE {\n"
        "static const struct { int a; } g_table[] = {{1}, {2}};\n"
        "static inline __attribute__((always_inline)) int\n"
        "first(int x) {\n"
        '    const char *s = "}";\n'
        "    if (x) {\n"
        "        return '{';\n"
        "    }\n"
        "    return 0;\n"
        "}\n"
        "HOOK int second(void) { return 1; }\n"
    )
    assert functions(source, "sample.c") == [
        Function("sample.c", "first", 4, 8),
        Function("sample.c", "second", 12, 1),
    ]


def test_the_layer_functions_are_found() -> None:
    names = {(fn.file, fn.name) for fn in native_functions()}
    assert ("conn.c", "conn_call") in names
    assert ("preload.c", "layer_resolve") in names


def test_no_native_function_is_over_the_limit() -> None:
    over = [fn for fn in native_functions() if fn.lines > LIMIT and not _pending(fn)]
    assert over == [], "break these up (issue 19): " + ", ".join(
        f"{fn.file}:{fn.first_line} {fn.name} ({fn.lines} lines)" for fn in over
    )


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else LIMIT
    for fn in sorted(native_functions(), key=lambda f: -f.lines):
        if fn.lines > limit:
            print(f"{fn.lines:5d}  {fn.file}:{fn.first_line}  {fn.name}")
