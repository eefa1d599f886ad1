"""The benchmark suite: every figure beside its direct baseline, measured in the same run.

Run as `python -m bench [--quick] [--json OUT] [--only ID,...]` (as root: it builds a local
pod). Benchmarks never run in the pass/fail test suite.
"""

from __future__ import annotations

__all__: list[str] = []
