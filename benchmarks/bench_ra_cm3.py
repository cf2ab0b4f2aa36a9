"""RA-CM3 end to end: what one drawing and one caption cost through the public
`RACM3.generate_image` / `generate_caption` (what `mmrag generate` and the server call), with
the model's decoding settings against another set of settings (e.g. the previous shipped
`config.json`), item by item interleaved on the same held-out variants, on one thread.

`bench_generate.py` times the decoding loop alone; this times everything a request does:
retrieval, the copy, the analogy, pasting pixels, sampling, reranking, composing and verifying
captions. Issue 21: generation with the new decoding at least as fast as before, and one
image under 1 s.

Run: .venv/bin/python benchmarks/bench_ra_cm3.py --run .cache/runs/ra-cm3-bridged \\
    --baseline-config OLD_CONFIG.json [--model checkpoints/ra-cm3] [--n 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from machine import RESULTS, QuietMeter, machine_info, write_json
from mmrag.documents import load_image
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.data import CORPUS_FILE, Corpus
from mmrag.models.ra_cm3.model import RACM3, RACM3Config

GOAL_SECONDS_PER_IMAGE = 1.0
GOAL_RATIO = 1.0  # the model's decoding no slower than the baseline's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="RA-CM3 run folder (split, memory)")
    p.add_argument("--model", type=Path, default=None, help="model (default: the shipped one)")
    p.add_argument("--baseline-config", type=Path, required=True, help="decoding to compare")
    p.add_argument("--n", type=int, default=12, help="held-out variants timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "ra-cm3-speed.json")
    return p.parse_args(argv)


def timed(call: Any, *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    split = json.loads((args.run / "split.json").read_text(encoding="utf-8"))
    corpus = Corpus.load(args.run / CORPUS_FILE)
    rows = split["heldout"][: args.n]
    baseline_config = RACM3Config.load(args.baseline_config)
    meter = QuietMeter()
    times: dict[str, list[float]] = {k: [] for k in ("image", "caption")}
    base_times: dict[str, list[float]] = {k: [] for k in ("image", "caption")}
    with Memory.open(args.run / "memory") as memory:
        model = RACM3.from_pretrained(args.model, memory)
        base = model.with_config(baseline_config)
        model.generate_image(corpus.captions[rows[0]])  # warm-up: loads, caches
        base.generate_image(corpus.captions[rows[0]])
        for i, row in enumerate(rows):  # interleaved, so load changes hit both sides
            caption, image = corpus.captions[row], load_image(corpus.image_paths[row])
            for runner, into in ((model, times), (base, base_times)):
                into["image"].append(timed(runner.generate_image, caption, seed=i))
                into["caption"].append(timed(runner.generate_caption, image, seed=i))

    def ratio(kind: str) -> float:
        pairs = zip(times[kind], base_times[kind], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 3)

    image_s = statistics.median(times["image"])
    return {
        "benchmark": "ra-cm3 end to end",
        "machine": machine_info(),
        "config": {
            "run": str(args.run),
            "model": str(args.model or "checkpoints/ra-cm3"),
            "baseline_config": str(args.baseline_config),
            "items": len(rows),
            "threads": args.threads,
        },
        "seconds": {
            kind: {
                "model": [round(x, 3) for x in times[kind]],
                "baseline": [round(x, 3) for x in base_times[kind]],
                "model_median": round(statistics.median(times[kind]), 3),
                "baseline_median": round(statistics.median(base_times[kind]), 3),
                "model_over_baseline_median_paired": ratio(kind),
            }
            for kind in times
        },
        "goals": {
            "seconds_per_image": GOAL_SECONDS_PER_IMAGE,
            "pass_seconds": image_s < GOAL_SECONDS_PER_IMAGE,
            "model_over_baseline": GOAL_RATIO,
            "pass_ratio": max(ratio("image"), ratio("caption")) <= GOAL_RATIO,
        },
        "quiet": meter.report(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    s = result["seconds"]
    print(
        f"image {s['image']['model_median']} s (baseline {s['image']['baseline_median']} s, "
        f"ratio {s['image']['model_over_baseline_median_paired']}); caption "
        f"{s['caption']['model_median']} s (baseline {s['caption']['baseline_median']} s, ratio "
        f"{s['caption']['model_over_baseline_median_paired']}); quiet={result['quiet']['quiet']}"
        f" -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
