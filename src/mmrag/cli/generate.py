"""`mmrag generate image|caption|infill-image|infill-caption`: RA-CM3 from the command line.

A thin layer over `mmrag.RACM3`: load the model (default: the shipped checkpoint) and the
memory to retrieve from, run one request, print the output and its evidence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmrag.documents import decode_image
from mmrag.models.ra_cm3.model import RACM3, CaptionOutput, ImageOutput


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("memory", help="memory folder to retrieve from (and read --demo ids from)")
    p.add_argument(
        "--model",
        default=None,
        help="RA-CM3 model folder (default: the shipped checkpoints/ra-cm3)",
    )
    p.add_argument(
        "--no-retrieval",
        action="store_true",
        help="condition on nothing retrieved (the same model without retrieval)",
    )
    p.add_argument(
        "--demo",
        nargs="+",
        default=[],
        metavar="DOC_ID",
        help="pinned in-context demonstrations (memory ids) used in place of retrieval",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"output": ..., "evidence": [{"id", "score", "source"}], ...}',
    )


def _copy_weight(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--copy-weight",
        type=float,
        default=None,
        help="draw each image code from (1 - W) * the model + W * the copied image's code at "
        "that cell, whatever the match; 0 = the generator alone (default: the model config's "
        "gate: 1 for a stored caption, else its copy_weight)",
    )


def _caption_copy(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--copy-weight",
        type=float,
        default=None,
        help="draw each caption token from (1 - W) * the model + W * the token the copied "
        "caption suggests, whatever the match; 0 = the generator alone (default: the model "
        "config's gate: 1 for a stored image, else its text_copy_weight)",
    )
    p.add_argument(
        "--no-compose",
        action="store_true",
        help="keep the generator's sample of lowest perplexity instead of ranking it with the "
        "retrieved captions and their recombinations by the dual encoder",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrag generate",
        description="Generate with RA-CM3, conditioned on documents retrieved from MEMORY.",
    )
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = sub.add_parser("image", help="caption -> image")
    _common(p)
    p.add_argument("--caption", required=True, help="what to draw")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="images sampled; the dual encoder keeps the best (default: model config)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, 1 = off (default: model config)",
    )
    _copy_weight(p)
    p = sub.add_parser("caption", help="image -> caption")
    _common(p)
    p.add_argument("--image", required=True, help="image file to caption")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="captions sampled (default: model config)",
    )
    _caption_copy(p)
    p = sub.add_parser("infill-image", help="regenerate a band of rows of an image")
    _common(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument(
        "--rows",
        required=True,
        metavar="TOP:BOTTOM",
        help="VQ grid rows to regenerate, [TOP, BOTTOM) of 16 (e.g. 8:16)",
    )
    p.add_argument("--caption", default=None, help="what the image shows (optional)")
    p.add_argument("--out", required=True, help="PNG file to write")
    _copy_weight(p)
    p = sub.add_parser("infill-caption", help="fill the <mask> in a caption of an image")
    _common(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--caption", required=True, help='caption with one "<mask>"')
    p.add_argument("--samples", type=int, default=None, help="captions sampled")
    _caption_copy(p)
    return parser


def _rows(text: str) -> tuple[int, int]:
    top, sep, bottom = text.partition(":")
    if not sep:
        raise ValueError(f"--rows {text!r}: expected TOP:BOTTOM")
    return int(top), int(bottom)


def _generate(model: RACM3, args: argparse.Namespace) -> ImageOutput | CaptionOutput:
    common = {"retrieval": not args.no_retrieval, "demos": args.demo, "seed": args.seed}
    if args.what == "image":
        return model.generate_image(
            args.caption, args.samples, args.guidance, copy_weight=args.copy_weight, **common
        )
    image = decode_image(Path(args.image).read_bytes(), args.image)
    if args.what == "infill-image":
        rows = _rows(args.rows)
        return model.infill_image(image, rows, args.caption, copy_weight=args.copy_weight, **common)
    text = {"copy_weight": args.copy_weight, "compose": False if args.no_compose else None}
    if args.what == "caption":
        return model.generate_caption(image, args.samples, **common, **text)
    return model.infill_caption(image, args.caption, samples=args.samples, **common, **text)


def run(args: argparse.Namespace) -> int:
    from mmrag.memory.memory import Memory

    with Memory.open(args.memory) as memory:
        model = RACM3.from_pretrained(args.model, memory=memory)
        result = _generate(model, args)
    if isinstance(result, ImageOutput):
        result.image.save(args.out, format="PNG")
        payload = result.to_json(str(args.out))
        text = f"wrote {args.out}"
    else:
        payload, text = result.to_json(), result.text
    if args.json:
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        print(text)
        for e in payload["evidence"]:
            print(f"  evidence {e['source']:9} {e['score']:.4f}  {e['id']}")
    return 0


def main(argv: list[str]) -> int:
    return run(build_parser().parse_args(argv))
