"""Look at the retriever on pictures it never saw: Openclipart's and GCompris's held-out
categories and the photos, ingested as images alone with a held-out `lite` run, searched by
a dozen captions.

Writes a contact sheet (a row per query: the top 5 images) and prints each query's results with
the captions the images were not indexed with. The held-out categories are those of the
encoder trainer's split (`--holdout`, `--seed`, as the run was trained).

Run: .venv/bin/python benchmarks/show_encoder.py --encoder .cache/runs/lite-share-holdout
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from mmrag.data.readers import read_sources
from mmrag.demo.report import images_only
from mmrag.encoders.base import EncoderSpec
from mmrag.encoders.pairs import group_side
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.retrieval import Retriever

QUERIES = (
    "a cat",
    "a dog",
    "a horse",
    "a cup of coffee",
    "a red motorcycle",
    "an astronaut",
    "a flower",
    "a fish",
    "a clock",
    "a truck",
    "a camera",
    "a chair",
    "a bear",
    "a duck",
    "a bucket",
)
K = 5
THUMB = 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="a lite checkpoint trained with a holdout")
    p.add_argument("--openclipart", type=Path, default=Path(".cache/data/openclipart"))
    p.add_argument("--gcompris", type=Path, default=Path(".cache/data/gcompris"))
    p.add_argument("--photos", type=Path, default=Path(".cache/data/photos"))
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/encoders-heldout.png"))
    return p.parse_args(argv)


def held_out(source: Path, work: Path, holdout: float, seed: int) -> Path:
    """A folder under `work` listing the documents of `source`'s held-out categories."""
    held = work / source.name
    held.mkdir()
    lines = [
        line
        for line in (source / "documents.jsonl").read_text().splitlines(True)
        if group_side(json.loads(line)["metadata"]["category"], holdout, seed) == 2
    ]
    (held / "documents.jsonl").write_text("".join(lines))
    (held / "images").symlink_to((source / "images").resolve())
    return held


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="show-encoder-"))
    try:
        held = [held_out(args.openclipart, work, args.holdout, args.seed)]
        if (args.gcompris / "documents.jsonl").is_file():
            held.append(held_out(args.gcompris, work, args.holdout, args.seed))
        spec = EncoderSpec(name="lite", path=args.encoder)
        with ensure_memory(work / "memory", spec) as memory:
            ingest(memory, images_only(read_sources([*held, args.photos])), progress=False)
        with Memory.open(work / "memory") as memory:
            retriever = Retriever(memory)
            rows = [(q, retriever.search(text=q, k=K)) for q in QUERIES]
            size = len(memory)
        side = THUMB + 10
        sheet = Image.new("RGB", ((K + 1) * side, len(rows) * side), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (query, results) in enumerate(rows):
            draw.text((5, i * side + side // 2 - 5), query, fill="black")
            print(
                f"{query}: "
                + "; ".join(f"{r.metadata.get('caption', '')} ({r.score:.3f})" for r in results)
            )
            for j, r in enumerate(results):
                with Image.open(r.image or "") as src:
                    image = src.convert("RGB")
                image.thumbnail((THUMB, THUMB))
                sheet.paste(image, ((j + 1) * side, i * side))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out)
        print(f"{size} unseen images; wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
