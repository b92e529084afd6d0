"""How busy the machine is before a benchmark starts, so that its figures can be read.

Other processes on the same cores (tests, other jobs, other tenants of a virtual machine)
slow every figure down, and ratios measured under load are not those of an idle machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot (Linux), None elsewhere."""
    try:
        fields = [int(value) for value in PROC_STAT.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float = 2.0) -> float | None:
    """Share of all cores busy over the next ``seconds`` while this process sleeps (None off Linux)."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def describe_load(seconds: float = 2.0) -> str:
    """One line: cores, and how busy other processes kept them just before the benchmark."""
    share = busy_share(seconds)
    load = "unknown" if share is None else f"{share:.0%}"
    return f"{os.cpu_count()} CPU cores; busy with other work before the run: {load} (figures assume an idle machine)"
