"""The learning-rate schedule every trainer uses: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, floor: float = 0.1) -> float:
    """The rate at `step` (0-based): `lr * (step + 1) / warmup` for the first `warmup` steps,
    then a cosine from `lr` down to `lr * floor` at `steps`, held there after."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (floor + (1 - floor) * cosine)
