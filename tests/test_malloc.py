"""`mirrord._malloc`: big buffers come from the heap (`tune_malloc`), and `trim_malloc` gives
the heap's free memory back, as the daemon does a moment after a session closed."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from mirrord._malloc import trim_malloc, tune_malloc

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

assert tune_malloc()
# 1 MiB buffers, as relayed frames are: below the mmap threshold, so from the heap
chunks = [bytes(1024 * 1024 - 64) + bytes([i % 256]) for i in range(60)]
peak = rss_kib()
del chunks
kept = rss_kib()
trim_malloc()
print(peak, kept, rss_kib())
"""


def test_trim_gives_back_what_the_thresholds_keep() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    peak, kept, trimmed = (int(x) for x in out.stdout.split())
    assert peak - kept < 16 * 1024, (peak, kept)  # the heap kept the freed buffers
    assert kept - trimmed > 40 * 1024, (kept, trimmed)  # and gave them back when trimmed
