"""Reading an executable's ELF header: whether the layer can be preloaded into it.

Owns: `static_executable`, used by `mirrord ext` (a warning) and `mirrord run` (the
system-call supervisor for static programs). Imports nothing heavy: the fast path of
`mirrord run` uses it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["static_executable"]


def static_executable(path: Path) -> bool:
    """Whether `path` is an ELF executable without an interpreter (statically linked): the
    layer cannot be preloaded into it. False for anything unreadable or not ELF."""
    import struct

    try:
        with path.open("rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
                return False
            wide = ident[4] == 2
            end = "<" if ident[5] == 1 else ">"
            if wide:
                phoff, phentsize, phnum = (
                    struct.unpack_from(end + "Q", ident, 32)[0],
                    *struct.unpack_from(end + "HH", ident, 54),
                )
            else:
                phoff, phentsize, phnum = (
                    struct.unpack_from(end + "I", ident, 28)[0],
                    *struct.unpack_from(end + "HH", ident, 42),
                )
            if phnum == 0 or phentsize < 4 or phnum > 4096:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    PT_INTERP = 3
    for i in range(len(table) // phentsize):
        if struct.unpack_from(end + "I", table, i * phentsize)[0] == PT_INTERP:
            return False
    return True
