"""`python -m mirrord.agent` is `mirrord-agent`."""

from __future__ import annotations

from mirrord.agent import main

main()
