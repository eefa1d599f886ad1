"""Build hook: compile native/*.c into mirrord/layer/libmirrord_layer.so, and
native/supervisor/*.c into mirrord/layer/mirrord-supervisor (an executable).

The layer is a plain shared library for LD_PRELOAD, not a Python extension, and the supervisor
a plain program: both are built through setuptools' build_ext only so that `pip install .` and
`pip install -e .` both produce them, offline, with the system C compiler.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = "native"
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / NATIVE).glob("*.c"))
HEADERS = sorted(str(p.relative_to(HERE)) for p in (HERE / NATIVE).glob("*.h"))
SUPERVISOR_DIR = HERE / NATIVE / "supervisor"
SUPERVISOR_SOURCES = sorted(str(p.relative_to(HERE)) for p in SUPERVISOR_DIR.glob("*.c"))
SUPERVISOR_HEADERS = sorted(str(p.relative_to(HERE)) for p in SUPERVISOR_DIR.glob("*.h"))
SUPERVISOR_NAME = "mirrord-supervisor"
SUPERVISOR = f"mirrord.layer.{SUPERVISOR_NAME}"
C_FLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]


# native/layer_build.py: the kinds header generated from the message catalogue, and the build
# id. Loaded by path: the build runs before (and without) the package being importable.
_spec = importlib.util.spec_from_file_location("layer_build", HERE / NATIVE / "layer_build.py")
assert _spec is not None and _spec.loader is not None
layer_build = importlib.util.module_from_spec(_spec)
sys.modules["layer_build"] = layer_build  # dataclasses look their module up by name
_spec.loader.exec_module(layer_build)


class BuildLayer(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # libmirrord_layer.so, not the ABI-tagged name of a Python extension.
        *pkg, name = fullname.split(".")
        return os.path.join(*pkg, name if name == SUPERVISOR_NAME else name + ".so")

    def copy_file(self, infile: str, outfile: str, *args: object, **kwargs: object) -> object:
        # Editable installs copy the library into the source tree. Replace the file instead
        # of rewriting it in place: processes that have the old one preloaded keep a valid
        # mapping (rewriting a mapped library crashes them).
        if str(outfile).endswith((".so", "-supervisor")) and os.path.exists(outfile):
            os.unlink(outfile)
        return super().copy_file(infile, outfile, *args, **kwargs)  # type: ignore[arg-type]

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # no PyInit_*: this is not a Python module

    def build_extension(self, ext: Extension) -> None:
        if ext.name == SUPERVISOR:
            out = Path(self.get_ext_fullpath(ext.name))
            objects = self.compiler.compile(
                ext.sources,
                output_dir=self.build_temp,
                include_dirs=ext.include_dirs,
                extra_postargs=ext.extra_compile_args,
                depends=ext.depends,
            )
            if out.exists():
                out.unlink()  # a running supervisor keeps its mapping (ETXTBSY otherwise)
            self.compiler.link("executable", objects, str(out), extra_postargs=ext.extra_link_args)
            return
        generated = Path(self.build_temp) / "generated"
        layer_build.write_kinds_header(generated)
        ext.include_dirs = [str(generated), *ext.include_dirs]
        ext.define_macros = [("MIRRORD_BUILD_ID", f'"{layer_build.build_id()}"')]
        super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "mirrord.layer.libmirrord_layer",
            sources=SOURCES,
            # the generated kinds.h follows the message catalogue; the generator is a
            # dependency so that a source distribution carries it
            depends=[*HEADERS, f"{NATIVE}/layer_build.py", "src/mirrord/protocol/messages.py"],
            include_dirs=[NATIVE],
            extra_compile_args=[*C_FLAGS, "-fvisibility=hidden", "-fPIC"],
            extra_link_args=["-ldl", "-lpthread"],
        ),
        Extension(
            SUPERVISOR,
            sources=SUPERVISOR_SOURCES,
            depends=[*SUPERVISOR_HEADERS, f"{NATIVE}/stat_conv.h"],
            include_dirs=[f"{NATIVE}/supervisor"],
            extra_compile_args=C_FLAGS,
            extra_link_args=["-ldl", "-lpthread"],
        ),
    ],
    cmdclass={"build_ext": BuildLayer},
    package_data={"mirrord.layer": ["*.so", "mirrord-supervisor"]},
)
