"""`mmrag eval vq`: how well VQ tokenizers reconstruct the images they never trained on.

The held-out split is the one `mmrag train vq` makes (whole `base` groups, same fraction and
seed), so the images are emoji the tokenizer never saw in any variant. Per tokenizer:
- PSNR (dB, mean per image, [0, 1] scale) and the share of the codebook the images use;
- reconstruction FID: the Frechet distance between the declared extractor's features
  (EfficientNet-Lite0, see mmrag.metrics.fid) of the reconstructions and of the images at the
  tokenizer's resolution, so it measures what the tokenizer loses, not the resolution. It is
  the floor under the FID of any generator that draws through this tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmrag.metrics.fid import FID_EXTRACTOR, fid_features, frechet_distance
from mmrag.metrics.report import prepare, report
from mmrag.models.vq.data import load_images, split_holdout, to_unit
from mmrag.models.vq.model import VQModel, psnr, tensor_to_images

logger = logging.getLogger(__name__)


def reconstructions(
    model: VQModel, pixels: torch.Tensor, device: torch.device, batch_size: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of uint8 (N, 3, S, S) `pixels`, in eval mode and without gradients: the
    images in [0, 1] on `device`, their codes (B, h, w) and their reconstructions."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                x = to_unit(pixels[start : start + batch_size]).to(device)
                codes = model.encode(x)  # (B, h, w)
                yield x, codes, model.decode(codes)
    finally:
        model.train(was_training)


def scores(model: VQModel, pixels: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """PSNR, codebook usage and reconstruction FID of uint8 (N, 3, S, S) `pixels`, from one
    encode -> decode pass."""
    originals, recons = [], []
    psnrs, used = [], torch.zeros(model.config.codebook_size, dtype=torch.bool)
    for x, codes, recon in reconstructions(model, pixels, model.device, batch_size):
        psnrs.append(psnr(recon, x).cpu())
        used[codes.flatten().cpu()] = True
        originals += tensor_to_images(x.cpu())
        recons += tensor_to_images(recon.cpu())
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "usage": float(used.float().mean()),
        "reconstruction_fid": frechet_distance(fid_features(recons), fid_features(originals)),
    }


def evaluate_vqs(
    folders: Sequence[Path],
    data: Sequence[Path],
    holdout: float = 0.1,
    seed: int = 0,
    group_key: str = "base",
    limit: int | None = None,
) -> dict[str, Any]:
    """Scores of each tokenizer on the held-out images (the first `limit` of them)."""
    models = [VQModel.from_pretrained(f) for f in folders]
    sizes = {m.config.image_size for m in models}
    if len(sizes) != 1:
        raise ValueError(f"the tokenizers work at different sizes {sorted(sizes)}")
    images = load_images(data, sizes.pop(), group_key)
    _, held = split_holdout(images.groups, holdout, seed)
    pixels = images.pixels[held[:limit]]
    if len(pixels) < 2:
        raise ValueError("fewer than two held-out images: lower --holdout or add data")
    results = {}
    for folder, model in zip(folders, models, strict=True):
        row = scores(model, pixels)
        results[str(folder)] = row
        logger.info("%s: %s", folder, row)
    return {
        "tokenizers": results,
        "heldout_images": len(pixels),
        "split": {"holdout": holdout, "seed": seed, "group_key": group_key},
        "fid_extractor": FID_EXTRACTOR,
        "data": [str(d) for d in data],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['heldout_images']} held-out images; FID on {result['fid_extractor']}",
        "",
        "| tokenizer | PSNR (dB) ↑ | codebook usage ↑ | reconstruction FID ↓ |",
        "|---|---|---|---|",
    ]
    for name, row in result["tokenizers"].items():
        lines.append(
            f"| {name} | {row['psnr']:.2f} | {row['usage']:.3f} | {row['reconstruction_fid']:.1f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmrag eval vq",
        description="Reconstruction PSNR, codebook usage and reconstruction FID "
        "(EfficientNet-Lite0 features) of VQ tokenizers on the images `mmrag train vq` holds "
        "out (whole groups).",
    )
    p.add_argument("vq", nargs="+", type=Path, help="VQ checkpoint folders (e.g. checkpoints/vq)")
    p.add_argument("--data", nargs="+", required=True, type=Path, help="the collections trained on")
    p.add_argument("--holdout", type=float, default=0.1, help="train vq's --holdout (0.1)")
    p.add_argument("--seed", type=int, default=0, help="train vq's --seed (0)")
    p.add_argument("--group-key", default="base", help="train vq's --group-key (base)")
    p.add_argument("--limit", type=int, help="score only the first N held-out images")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/eval-vq.json"), help="results JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prepare(args.threads)
    try:
        result = evaluate_vqs(
            args.vq, args.data, args.holdout, args.seed, args.group_key, args.limit
        )
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    report(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
