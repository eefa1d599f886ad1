"""`python -m bench [--quick] [--json OUT] [--only ID,...]`."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from rich.console import Console

from bench._core import evaluate, print_table, write_json
from bench._env import BenchEnv
from bench._figures import figures

__all__ = ["main"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs (< 2 min)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write one object per figure")
    parser.add_argument("--only", help="comma-separated figure ids")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    env = BenchEnv(quick=args.quick)
    rows = []
    start = time.monotonic()
    try:
        figs = figures(env)
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {f.id for f in figs}
            if unknown:
                sys.exit(f"unknown figure ids: {', '.join(sorted(unknown))}")
            figs = [f for f in figs if f.id in wanted]
        for fig in figs:
            console.print(f"[dim]measuring {fig.id} ...[/dim]")
            rows.append(evaluate(fig, args.quick))
    finally:
        env.close()
    print_table(rows, console)
    console.print(
        f"machine: {platform.machine()}, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}; took {time.monotonic() - start:.0f} s"
    )
    if args.json:
        write_json(rows, args.json)
