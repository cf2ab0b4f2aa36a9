"""Look at RA-CM3's outputs: a dozen held-out (test) emoji variants, each drawn from its caption
and captioned from its image through the public `RACM3.generate_image` / `generate_caption`
(what `mmrag generate` runs) with the shipped decoding, beside its top evidence and the truth.

Not a benchmark: it writes a figure (rows: truth, drawn, top evidence) and a markdown table of
the captions for docs/ra-cm3.md.

Run: .venv/bin/python benchmarks/show_ra_cm3.py --run .cache/runs/ra-cm3-bridged [--n 12] \\
    [--png docs/ra-cm3-heldout.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from mmrag.documents import load_image
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.data import CORPUS_FILE, Corpus
from mmrag.models.ra_cm3.model import RACM3

CELL = 96


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="RA-CM3 run folder (split, memory)")
    p.add_argument("--model", type=Path, default=None, help="model (default: the shipped one)")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--png", type=Path, default=Path("docs/ra-cm3-heldout.png"))
    args = p.parse_args(argv)
    split = json.loads((args.run / "split.json").read_text(encoding="utf-8"))
    corpus = Corpus.load(args.run / CORPUS_FILE)
    rows = split["heldout"][: args.n]
    sheet = Image.new("RGB", (CELL * len(rows), CELL * 3), "white")
    lines = [
        "| # | truth | RA-CM3 caption | top retrieved caption | drawn: top evidence |",
        "|---|---|---|---|---|",
    ]
    with Memory.open(args.run / "memory") as memory:
        model = RACM3.from_pretrained(args.model, memory)
        for i, row in enumerate(rows):
            caption, image = corpus.captions[row], load_image(corpus.image_paths[row])
            drawn = model.generate_image(caption, seed=i)
            written = model.generate_caption(image, seed=i)
            top = model.evidence(None, image, k=1)
            shown = drawn.evidence[0] if drawn.evidence else None
            evidence = (
                load_image(shown.image) if shown and shown.image else Image.new("RGB", (8, 8))
            )
            for r, im in enumerate((image, drawn.image, evidence)):
                sheet.paste(im.convert("RGB").resize((CELL, CELL)), (CELL * i, CELL * r))
            lines.append(
                f"| {i + 1} | {caption} | {written.text} | {top[0].text if top else ''} | "
                f"{shown.text if shown else ''} |"
            )
    args.png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.png, optimize=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
