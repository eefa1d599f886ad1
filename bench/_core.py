"""Figures, the results table and the JSON output.

A figure function returns a `Result` (value, baseline, ratio, target) or raises `NotAvailable`
when the feature it measures does not exist yet; it never invents a number.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

__all__ = ["Figure", "NotAvailable", "Result", "median_of", "print_table", "write_json"]

Better = Literal["lower", "higher", "report"]


class NotAvailable(Exception):
    """The feature this figure measures is not available; the message says which."""


@dataclass(frozen=True)
class Result:
    value: float | None
    baseline: float | None
    unit: str
    note: str = ""
    extra: dict[str, float] | None = None
    # The figure's own ratio estimate when value / baseline is not the best one (the median of
    # paired ratios, for figures whose machine noise is larger than the effect measured).
    ratio: float | None = None


@dataclass(frozen=True)
class Figure:
    id: str
    what: str
    baseline_what: str
    better: Better  # is a lower or a higher ratio the good direction; or report only
    target: float | None  # ratio bound (<= for lower, >= for higher)
    run: Callable[[bool], Result]  # argument: quick


@dataclass
class Row:
    id: str
    what: str
    value: float | None
    baseline: float | None
    unit: str
    ratio: float | None
    target: str
    met: bool | None
    note: str
    extra: dict[str, float] | None


def median_of(fn: Callable[[], float], runs: int, warmup: int = 1) -> float:
    """Median of `runs` calls of `fn` (each returns a measurement), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(runs))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def evaluate(fig: Figure, quick: bool) -> Row:
    target = "report"
    if fig.target is not None:
        target = f"{'≤' if fig.better == 'lower' else '≥'} {fig.target:g}x"
    try:
        res = fig.run(quick)
    except NotAvailable as exc:
        return Row(fig.id, fig.what, None, None, "", None, target, None, f"n/a: {exc}", None)
    except Exception as exc:  # a present feature that failed: say so, never a number
        return Row(
            fig.id, fig.what, None, None, "", None, target, False, f"error: {exc!r}"[:300], None
        )
    ratio = res.ratio
    if ratio is None and res.value is not None and res.baseline:
        ratio = res.value / res.baseline
    met: bool | None = None
    if fig.target is not None and ratio is not None:
        met = ratio <= fig.target if fig.better == "lower" else ratio >= fig.target
    return Row(
        fig.id, fig.what, res.value, res.baseline, res.unit, ratio, target, met, res.note, res.extra
    )


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0 or 0.01 <= abs(v) < 100_000:
        return f"{v:.4g}"
    return f"{v:.3e}"


def print_table(rows: list[Row], console: Console) -> None:
    table = Table(title="mirrord benchmarks (each figure beside its baseline from this run)")
    for col in ("figure", "mirrord", "baseline", "unit", "ratio", "target", "met", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        met = "n/a" if r.met is None else ("yes" if r.met else "NO")
        table.add_row(
            r.id, _fmt(r.value), _fmt(r.baseline), r.unit, _fmt(r.ratio), r.target, met, r.note
        )
    console.print(table)


def write_json(rows: list[Row], path: Path) -> None:
    out = []
    for r in rows:
        d = asdict(r)
        out.append(
            {
                "id": d["id"],
                "what": d["what"],
                "value": d["value"],
                "baseline": d["baseline"],
                "unit": d["unit"],
                "ratio": d["ratio"],
                "target": d["target"],
                "met": d["met"],
                "note": d["note"],
                **({"extra": d["extra"]} if d["extra"] else {}),
            }
        )
    path.write_text(json.dumps(out, indent=2) + "\n")
