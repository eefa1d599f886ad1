"""Reading an executable's ELF headers: whether the layer can reach it.

Owns: `static_executable` (no interpreter: the layer cannot be preloaded), `go_executable`
(a Go build-id note: Go makes its file and socket system calls itself, so the layer sees
none of them even when it is loaded) and `needs_supervisor` (either). Used by `mirrord ext`
(a warning) and `mirrord run` (the system-call supervisor). Imports nothing heavy: the fast
path of `mirrord run` uses it.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["go_executable", "needs_supervisor", "static_executable"]

_PT_INTERP = 3
_PT_NOTE = 4
_NT_GO_BUILD_ID = 4  # the note `go build` writes, named "Go"
_NOTE_CAP = 1 << 16  # a note segment bigger than this is not Go's (it is tiny)


def _segments(path: Path) -> tuple[str, list[tuple[int, bytes]]] | None:
    """The byte order ("<" or ">") and, for each program header, (p_type, the segment's bytes
    if it is a PT_NOTE else b""); None for anything unreadable or not ELF."""
    try:
        with path.open("rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
                return None
            wide = ident[4] == 2
            end = "<" if ident[5] == 1 else ">"
            phoff = struct.unpack_from(end + ("Q" if wide else "I"), ident, 32 if wide else 28)[0]
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 54 if wide else 42)
            if phnum == 0 or phentsize < (56 if wide else 32) or phnum > 4096:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            out = []
            for i in range(len(table) // phentsize):
                entry = table[i * phentsize : (i + 1) * phentsize]
                kind = struct.unpack_from(end + "I", entry, 0)[0]
                data = b""
                if kind == _PT_NOTE:
                    offset, size = (
                        struct.unpack_from(end + "Q", entry, 8)[0],
                        struct.unpack_from(end + "Q", entry, 32)[0],
                    ) if wide else (
                        struct.unpack_from(end + "I", entry, 4)[0],
                        struct.unpack_from(end + "I", entry, 16)[0],
                    )  # fmt: skip
                    f.seek(offset)
                    data = f.read(min(size, _NOTE_CAP))
                out.append((kind, data))
            return end, out
    except OSError:
        return None


def _has_go_note(notes: bytes, end: str) -> bool:
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from(end + "III", notes, at)
        name = notes[at + 12 : at + 12 + namesz]
        if name.rstrip(b"\0") == b"Go" and kind == _NT_GO_BUILD_ID:
            return True
        at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def static_executable(path: Path) -> bool:
    """Whether `path` is an ELF executable without an interpreter (statically linked): the
    layer cannot be preloaded into it. False for anything unreadable or not ELF."""
    found = _segments(path)
    return found is not None and all(kind != _PT_INTERP for kind, _ in found[1])


def go_executable(path: Path) -> bool:
    """Whether `path` is an ELF executable built by Go (its build-id note), linked statically
    or dynamically (cgo)."""
    found = _segments(path)
    return found is not None and any(
        kind == _PT_NOTE and _has_go_note(data, found[0]) for kind, data in found[1]
    )


def needs_supervisor(path: Path) -> bool:
    """Whether only the system-call supervisor reaches `path`'s calls: static or Go."""
    return static_executable(path) or go_executable(path)
