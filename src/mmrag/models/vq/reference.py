"""Decoding codes with a reference image: keep the reference's pixels where the codes are its.

A drawing that copies most of its codes from a retrieved image (RA-CM3's copy interpolation)
loses, through the VQ decoder, the detail the retrieved image has: the decoder is a 64-pixel
reconstruction (docs/ra-cm3.md). Where a cell's code is the code the reference image holds at
that cell, the reference's own pixels are what that code stands for there; elsewhere the
decoder draws. `paste_reference` does this at any output size (the reference is resized from its
stored resolution, the decoding upsampled), with the mask's edges feathered so that pasted
and decoded cells blend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from mmrag.models.vq.model import square_resize


def upscale(image: Image.Image, size: int) -> Image.Image:
    """`image` at `size` x `size` (bicubic; unchanged if it is that size already)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def agreement_mask(
    codes: Sequence[int], reference_codes: Sequence[int], grid: int, size: int, feather: float
) -> np.ndarray:
    """(size, size, 1) float weights of the reference's pixels: 1 in cells whose code is the
    reference's, 0 elsewhere, edges blurred by a Gaussian of `feather` pixels."""
    if len(codes) != grid * grid or len(reference_codes) != grid * grid:
        raise ValueError(f"codes and reference codes must have {grid * grid} cells")
    agree = np.asarray(codes) == np.asarray(reference_codes)
    cells = Image.fromarray((agree.reshape(grid, grid) * 255).astype(np.uint8))
    mask = cells.resize((size, size), Image.Resampling.NEAREST)
    if feather > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(feather))
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def paste_reference(
    decoded: Image.Image,
    codes: Sequence[int],
    reference: Image.Image,
    reference_codes: Sequence[int],
    size: int,
    feather: float = 0.0,
) -> Image.Image:
    """`decoded` (the VQ's decoding of `codes`) at `size` pixels, with the pixels of
    `reference` (whose VQ codes are `reference_codes`) wherever the codes agree. Both code
    lists are a square grid, row by row."""
    grid = round(len(codes) ** 0.5)
    mask = agreement_mask(codes, reference_codes, grid, size, feather)
    if not mask.any():
        return upscale(decoded, size)
    base = np.asarray(upscale(decoded.convert("RGB"), size), dtype=np.float32)
    pixels = np.asarray(square_resize(reference, size), dtype=np.float32)
    out = mask * pixels + (1.0 - mask) * base
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


def _differences(a: Image.Image, b: Image.Image, side: int) -> np.ndarray:
    """(side, side, 3) absolute differences of the two images square-resized to `side`."""
    x = np.asarray(square_resize(a.convert("RGB"), side), np.float32)
    y = np.asarray(square_resize(b.convert("RGB"), side), np.float32)
    return np.abs(x - y)


def pixel_distance(a: Image.Image, b: Image.Image, side: int = 32) -> float:
    """Mean absolute difference of two images' pixels (0 to 255), both square-resized to
    `side`: how alike they look, blind to detail finer than the side."""
    return float(_differences(a, b, side).mean())


def pixel_difference(
    a: Image.Image, b: Image.Image, quantile: float = 0.99, side: int = 32
) -> float:
    """The `quantile` of the two images' per-pixel differences (the largest over the channels,
    0 to 255) at `side`: near 0 only where no region differs, however small. A mean hides a
    small changed region (two skin tones of one emoji differ in a face); re-encoding noise
    (a JPEG) is spread thin and stays low."""
    return float(np.quantile(_differences(a, b, side).max(axis=2), quantile))
