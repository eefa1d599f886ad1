"""The layer library is built at install time and is inert when not configured."""

from __future__ import annotations

import os
import subprocess
import sys

from mirrord.layer import build_id, library_path


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
