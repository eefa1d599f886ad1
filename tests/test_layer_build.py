"""The layer library is built at install time and is inert when not configured."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from mirrord.layer import build_id, library_path
from mirrord.protocol._base import Message
from mirrord.protocol.messages import AGENT_KINDS, LAYER_KINDS, SHARED_KINDS


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}


def test_library_is_installed_with_a_build_id() -> None:
    path = library_path()
    assert path.name == "libmirrord_layer.so"
    assert path.is_file()
    assert len(build_id()) >= 8


def test_preloading_without_settings_changes_nothing() -> None:
    env = _clean_env()
    programs = [
        [sys.executable, "-c", "import os, sys; print(sorted(os.listdir('/')), sys.argv)"],
        ["/bin/true"],
        ["/bin/sh", "-c", "echo $HOME; cat /etc/hostname"],
    ]
    for argv in programs:
        plain = subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
        preloaded = subprocess.run(
            argv,
            env={**env, "LD_PRELOAD": str(library_path())},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert (preloaded.returncode, preloaded.stdout, preloaded.stderr) == (
            plain.returncode,
            plain.stdout,
            plain.stderr,
        ), argv


# ---------------------------------------------------------------- the wire kinds of the C side

ROOT = Path(__file__).resolve().parent.parent


def _layer_build() -> ModuleType:
    """native/layer_build.py, loaded by path as setup.py loads it."""
    spec = importlib.util.spec_from_file_location("layer_build", ROOT / "native" / "layer_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["layer_build"] = module
    spec.loader.exec_module(module)
    return module


def _catalogue() -> list[type[Message]]:
    return [*SHARED_KINDS, *AGENT_KINDS, *LAYER_KINDS]


def test_the_kinds_header_reads_every_message_as_the_classes_define_it() -> None:
    specs = {spec.kind: spec for spec in _layer_build().read_messages()}
    assert sorted(specs) == sorted(cls.KIND for cls in _catalogue())
    for cls in _catalogue():
        spec = specs[cls.KIND]
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        assert spec.name == cls.__name__
        assert [f.name for f in spec.fields] == [f.name for f in fields]
        assert [f.has_default for f in spec.fields] == [
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            for f in fields
        ], cls.__name__


def test_the_generated_header_compiles_to_the_catalogue(tmp_path: Path) -> None:
    layer_build = _layer_build()
    specs = layer_build.read_messages()
    layer_build.write_kinds_header(tmp_path)
    lines = "\n".join(
        f'    printf("%d %d %d\\n", {s.c_name}, {s.c_name}_NFIELDS, {s.c_name}_NREQUIRED);'
        for s in specs
    )
    program = tmp_path / "kinds.c"
    program.write_text(f'#include <stdio.h>\n#include "kinds.h"\nint main(void) {{\n{lines}\n}}\n')
    exe = tmp_path / "kinds"
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-Wall",
            "-Werror",
            "-I",
            str(tmp_path),
            "-o",
            str(exe),
            str(program),
        ],
        check=True,
        timeout=120,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60)
    expected = []
    for cls in sorted(_catalogue(), key=lambda c: c.KIND):
        fields = [f for f in dataclasses.fields(cls) if f.name != "request_id"]  # type: ignore[arg-type]
        required = [
            f
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        expected.append(f"{cls.KIND} {len(fields)} {len(required)}")
    assert out.stdout.splitlines() == expected


def _compile_request(tmp_path: Path, call: str) -> subprocess.CompletedProcess[str]:
    _layer_build().write_kinds_header(tmp_path)
    source = tmp_path / "request.c"
    source.write_text(f'#include "layer.h"\nvoid f(struct lconn *c) {{ {call}; }}\n')
    return subprocess.run(
        [
            *("gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"),
            *("-I", str(tmp_path), "-I", str(ROOT / "native")),
            *("-c", "-o", str(tmp_path / "request.o"), str(source)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_request_with_a_field_count_its_message_does_not_have_does_not_build(
    tmp_path: Path,
) -> None:
    # LayerListen: request_id, port, bound_address, bound_port
    assert _compile_request(tmp_path, "conn_begin(c, M_LAYER_LISTEN, 3)").returncode == 0
    wrong = _compile_request(tmp_path, "conn_begin(c, M_LAYER_LISTEN, 2)")
    assert wrong.returncode != 0
    assert "does not fit the message in src/mirrord/protocol/messages.py" in wrong.stderr
    # FileOpen's mode has a default: it may be left off, nothing more
    assert _compile_request(tmp_path, "conn_begin(c, M_FILE_OPEN, 2)").returncode == 0
    assert _compile_request(tmp_path, "conn_begin(c, M_FILE_OPEN, 4)").returncode != 0


def test_the_build_id_covers_the_protocol_module(tmp_path: Path) -> None:
    layer_build = _layer_build()
    shutil.copytree(ROOT / "native", tmp_path / "native")
    shutil.copytree(
        ROOT / "src" / "mirrord" / "protocol", tmp_path / "src" / "mirrord" / "protocol"
    )
    before = layer_build.build_id(tmp_path)
    messages = tmp_path / "src" / "mirrord" / "protocol" / "messages.py"
    messages.write_text(messages.read_text() + "\n# a change\n")
    after_protocol = layer_build.build_id(tmp_path)
    cbor = tmp_path / "native" / "cbor.c"
    cbor.write_text(cbor.read_text() + "\n/* a change */\n")
    after_native = layer_build.build_id(tmp_path)
    assert len({before, after_protocol, after_native}) == 3


def test_the_installed_layer_was_built_from_these_sources() -> None:
    assert build_id() == _layer_build().build_id(), (
        "the layer library is older than native/ or src/mirrord/protocol/: "
        "rebuild it with `pip install -e . --no-deps`"
    )


@pytest.mark.slow
def test_a_wheel_builds_from_the_tracked_files_alone(tmp_path: Path) -> None:
    # what a fresh clone has: the tracked files, no generated header, no build directory
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    checkout = tmp_path / "checkout"
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file() and not name.startswith(b"extensions/"):
            (checkout / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name.decode())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRRORD_", "PIP_"))}
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("-w", str(tmp_path / "dist"), str(checkout)),
        ],
        env=env,
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("mirrord-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        library = archive.read("mirrord/layer/libmirrord_layer.so")
    assert f"MIRRORD_BUILD_ID={_layer_build().build_id(checkout)};".encode() in library
    # the generated header is in the (ignored) build directory only, never among the sources
    generated = [p.relative_to(checkout).parts[0] for p in checkout.rglob("kinds.h")]
    assert generated == ["build"]
