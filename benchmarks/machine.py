"""What the benchmarks ran on: cores, CPU model, library versions, and how busy the machine was.

Shared by `bench_ingest.py` and `bench_search.py`. "Quiet" is measured, not assumed: the CPU
time the rest of the machine used during a run (from /proc/stat, minus this process's own)
is recorded beside the load averages.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / ".cache" / "bench"
PACKAGES = ("numpy", "faiss-cpu", "torch", "threadpoolctl")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, Python and library versions, date and git commit."""
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def _busy_jiffies() -> int:
    """All CPUs' non-idle time since boot, in clock ticks (first line of /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle  # guest time is already inside user/nice


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class QuietMeter:
    """Load average before/after, and the CPU the *other* processes used meanwhile.

    `other_cpu_fraction` is their CPU time over (wall time x cores): near 0 means the
    run had the machine to itself; 0.5 on 2 cores means another job held a full core.
    """

    def __init__(self) -> None:
        self.load_before = list(os.getloadavg())
        self._t0 = time.monotonic()
        self._busy0 = _busy_jiffies()
        self._own0 = _own_cpu_s()

    def report(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        busy = (_busy_jiffies() - self._busy0) / os.sysconf("SC_CLK_TCK")
        other = max(0.0, busy - (_own_cpu_s() - self._own0))
        cores = os.cpu_count() or 1
        fraction = other / (wall * cores) if wall > 0 else 0.0
        return {
            "load_before": [round(x, 2) for x in self.load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(wall, 1),
            "other_cpu_s": round(other, 1),
            "other_cpu_fraction": round(fraction, 3),
            "quiet": fraction < 0.05,
        }


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write `result` as indented JSON, atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}


def parse_size(text: str) -> int:
    """A benchmark size: 10k, 100k, 1m, or a number."""
    text = text.strip().lower()
    return SIZES.get(text) or int(text)


def with_defaults(args: Any, defaults: dict[str, Any]) -> Any:
    """`args` with every option left unset (None) taken from `defaults` (a FULL or QUICK
    table of a benchmark)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
