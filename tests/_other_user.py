"""Running code as another local user, for the checks that a session is its own user's only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

__all__ = ["OTHER_UID", "python_for_the_other_user"]

OTHER_UID = 65534  # nobody: a user with no rights over root's processes or files


def python_for_the_other_user() -> str:
    """A python the other user may run (the virtualenv's is usually under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        probe = (
            subprocess.run(
                [candidate, "-c", "import os; print(os.getuid())"],
                user=OTHER_UID,
                group=OTHER_UID,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if os.path.exists(candidate)
            else None
        )
        if probe is not None and probe.stdout.strip() == str(OTHER_UID):
            return candidate
    pytest.skip(f"no python that uid {OTHER_UID} may run")
