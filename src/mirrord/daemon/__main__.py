"""`python -m mirrord.daemon` is `mirrordd`."""

from __future__ import annotations

from mirrord.daemon._main import main

main()
