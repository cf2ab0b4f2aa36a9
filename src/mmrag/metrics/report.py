"""What every `mmrag eval NAME` command does around its evaluation: threads and logging
before, the results JSON and the markdown table after."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def prepare(threads: int | None) -> None:
    """Set torch's CPU threads (None: torch's choice) and INFO logging unless configured."""
    if threads:
        torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def report(result: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write `result` as JSON to `out` and its markdown table to stdout (the command's output)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(markdown(result) + "\n")
