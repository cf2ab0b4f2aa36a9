"""Image encoding speed of the `lite` encoder: the shipped (bridged) heads against the frozen
tower alone and against plain linear heads, interleaved in one run.

`encode_image` on B images at the default size (128) is what ingest and image queries run:
square crop and scaling, EfficientNet-Lite0's pooled features, then the heads. Measured on
320 x 240 inputs (the crop and resize count) and on inputs already at the tower's size (the
model's own cost, what docs/benchmarks.md's 104 images/s measured). The bridged
heads add the tower's own classifier (1280 -> 1000), a softmax, the top-k class names and the
residual: issue 17 asks that this stays >= 100 images/s at batch 64 on 2 cores, and that the
heads cost next to nothing beside the tower (`heads_over_tower`, the shipped encoder's time
over the tower's features alone, same images, same threads).

Run: .venv/bin/python benchmarks/bench_encoder.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from machine import RESULTS, QuietMeter, machine_info, write_json
from mmrag.config import LiteEncoderConfig
from mmrag.encoders.lite import LiteEncoder, LiteHeads

GOAL_IMAGES_PER_S = 100.0
GOAL_HEADS_OVERHEAD = 1.1  # the heads within 10% of the tower alone


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a few small batches (tests)")
    p.add_argument("--batch", type=int, default=64, help="images per encode call")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings per system")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="result JSON")
    return p.parse_args(argv)


def images(n: int, size: tuple[int, int]) -> list[Image.Image]:
    """Textured inputs of `size` (w, h): larger than the tower's, the crop and resize count."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    w, h = size
    return [
        Image.fromarray(np.roll(base, i, axis=0).repeat(h // 8, axis=0).repeat(w // 8, axis=1))
        for i in range(n)
    ]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    batch = 8 if args.quick else args.batch
    repeats = 2 if args.quick else args.repeats
    shipped = LiteEncoder.from_pretrained(None, batch_size=batch)
    size = shipped.config.image_size
    plain_config = LiteEncoderConfig(image_size=size)
    plain = LiteEncoder(plain_config, LiteHeads(plain_config), batch_size=batch)
    photos = images(batch, (320, 240))  # what a user ingests: cropped and resized first
    exact = images(batch, (size, size))  # already the tower's size: the model's own cost
    systems: dict[str, Callable[[], object]] = {
        "tower features": lambda: shipped.image_features(photos),
        "plain heads": lambda: plain.encode_image(photos),
        "shipped heads": lambda: shipped.encode_image(photos),
        f"tower features, {size} px input": lambda: shipped.image_features(exact),
        f"shipped heads, {size} px input": lambda: shipped.encode_image(exact),
    }
    for fn in systems.values():
        fn()  # warm-up
    meter = QuietMeter()
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):  # interleaved, so load changes hit every system
        for name, fn in systems.items():
            seconds[name].append(timed(fn))
    rates = {name: batch / statistics.median(s) for name, s in seconds.items()}
    ratio = statistics.median(
        [a / b for a, b in zip(seconds["shipped heads"], seconds["tower features"], strict=True)]
    )
    return {
        "benchmark": "encoder",
        "machine": machine_info(),
        "config": {
            "batch": batch,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "image_size": size,
            "bridged": shipped.config.bridged,
            "fingerprint": shipped.fingerprint(),
            "quick": args.quick,
        },
        "seconds": {name: [round(x, 4) for x in s] for name, s in seconds.items()},
        "images_per_s": {name: round(r, 1) for name, r in rates.items()},
        "heads_over_tower": round(ratio, 3),
        "goals": {
            "images_per_s": GOAL_IMAGES_PER_S,
            "pass_speed": rates[f"shipped heads, {size} px input"] >= GOAL_IMAGES_PER_S,
            "heads_over_tower": GOAL_HEADS_OVERHEAD,
            "pass_overhead": ratio <= GOAL_HEADS_OVERHEAD,
        },
        "load": meter.report(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = args.out or RESULTS / ("encoder-quick.json" if args.quick else "encoder.json")
    write_json(out, result)
    rates = result["images_per_s"]
    print(
        f"images/s at batch {result['config']['batch']}: "
        + ", ".join(f"{k} {v}" for k, v in rates.items())
        + f"; shipped / tower {result['heads_over_tower']}x; load {result['load']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
