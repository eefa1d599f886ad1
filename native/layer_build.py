"""Build helpers for the layer, used by setup.py and by tests/test_layer_build.py.

Owns: reading the message catalogue (`src/mirrord/protocol/messages.py`) into the C header
the layer includes as "kinds.h" (kind numbers, field counts, field order), and the layer's
build id. Does not own compiling (setup.py) or the messages themselves.

The catalogue is read with `ast`, not imported: the package build runs in an isolated
environment without the project's dependencies (cbor2), and `messages.py` needs none of them
to be read. tests/test_layer_build.py checks the result against the imported classes.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = ROOT / "src" / "mirrord" / "protocol" / "messages.py"
PROTOCOL = MESSAGES.parent
HEADER_NAME = "kinds.h"

# The C names the layer has always used for a few messages, shorter than the class names.
C_NAMES = {
    "ErrorReply": "M_ERROR",
    "StatFs": "M_STATFS",
    "StatFsReply": "M_STATFS_REPLY",
    "ReadLink": "M_READLINK",
    "ReadLinkReply": "M_READLINK_REPLY",
}


@dataclass(frozen=True)
class Field:
    name: str
    annotation: str
    has_default: bool


@dataclass(frozen=True)
class MessageSpec:
    name: str
    kind: int
    fields: tuple[Field, ...]

    @property
    def c_name(self) -> str:
        return C_NAMES.get(self.name) or "M_" + re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).upper()

    @property
    def body(self) -> tuple[Field, ...]:
        """The fields after the kind and, for requests and replies, the request id."""
        if self.fields and self.fields[0].name == "request_id":
            return self.fields[1:]
        return self.fields

    @property
    def required(self) -> int:
        return sum(1 for f in self.body if not f.has_default)


def _kind(decorator: ast.expr) -> int | None:
    if (
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Name)
        and decorator.func.id == "message"
    ):
        (arg,) = decorator.args
        if not isinstance(arg, ast.Constant) or not isinstance(arg.value, int):
            raise ValueError(f"@message() takes a literal kind, got {ast.unparse(arg)}")
        return arg.value
    return None


def read_messages(path: Path = MESSAGES) -> list[MessageSpec]:
    """Every `@message(kind)` class of the catalogue at `path`, in kind order."""
    specs = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        kinds = [k for k in map(_kind, node.decorator_list) if k is not None]
        if not kinds:
            continue
        fields = tuple(
            Field(stmt.target.id, ast.unparse(stmt.annotation), stmt.value is not None)
            for stmt in node.body
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and "ClassVar" not in ast.unparse(stmt.annotation)
        )
        specs.append(MessageSpec(node.name, kinds[0], fields))
    return sorted(specs, key=lambda s: s.kind)


def _field_text(f: Field) -> str:
    return f"{f.name}: {f.annotation}" + (" = ..." if f.has_default else "")


def kinds_header(specs: list[MessageSpec]) -> str:
    """The C header: one enumerator per message, its field counts, and a check of both."""
    out = [
        "/* Generated from src/mirrord/protocol/messages.py by native/layer_build.py when the",
        " * layer is built: do not edit, change the messages. On the wire a message is the array",
        " * [kind, request_id (requests and replies), fields...] in the order listed here; `= ...`",
        " * marks a field with a default, which a sender may leave off the end. */",
        "#ifndef MIRRORD_KINDS_H",
        "#define MIRRORD_KINDS_H",
        "",
        "enum {",
    ]
    for s in specs:
        fields = ", ".join(_field_text(f) for f in s.fields)
        out.append(f"    {s.c_name} = {s.kind}, /* {s.name}: {fields} */")
    out += ["};", ""]
    out.append(
        "/* The fields after the kind and request id: all of them, and those without a default. */"
    )
    for s in specs:
        out.append(f"#define {s.c_name}_NFIELDS {len(s.body)}")
        out.append(f"#define {s.c_name}_NREQUIRED {s.required}")
    out += ["", "/* 1 if a message of `kind` may carry n fields after its kind and request id. */"]
    out.append("#define M_FIELDS_FIT(kind, n) ( \\")
    for s in specs:
        out.append(
            f"    (kind) == {s.c_name} ? (n) >= {s.c_name}_NREQUIRED && (n) <= {s.c_name}_NFIELDS : \\"
        )
    out += ["    0)", "", "#endif", ""]
    return "\n".join(out)


def write_kinds_header(directory: Path, messages: Path = MESSAGES) -> Path:
    """Writes kinds.h into `directory` (made if missing) and returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HEADER_NAME
    text = kinds_header(read_messages(messages))
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def build_sources(root: Path = ROOT) -> list[Path]:
    """What the build id covers: the layer's C sources and headers, this generator, and the
    protocol package (messages and framing: both ends of the layer protocol)."""
    native = root / "native"
    protocol = root / PROTOCOL.relative_to(ROOT)
    return [
        *sorted(native.glob("*.c")),
        *sorted(native.glob("*.h")),
        native / Path(__file__).name,
        *sorted(protocol.glob("*.py")),
    ]


def build_id(root: Path = ROOT) -> str:
    """A hash of `build_sources`: the layer handshake checks both ends share it."""
    digest = hashlib.sha256()
    for path in build_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
