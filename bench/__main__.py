from __future__ import annotations

from bench._cli import main

main()
