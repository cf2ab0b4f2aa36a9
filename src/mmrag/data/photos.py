"""The `photos` data set: the real photographs that ship in scikit-image's data folder and
scikit-learn's sample images, captioned by hand."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmrag.data.writer import DatasetError, DatasetSummary, DatasetWriter

logger = logging.getLogger(__name__)

LONG_SIDE = 256

# skimage.data name -> a caption written by looking at the picture. Only photographs that
# ship inside the wheel (no pooch download). Left out: synthetic images (checkerboard,
# colorwheel, logo, shepp_logan_phantom), the binary horse silhouette, `cat` (the same
# picture as `chelsea`) and the 25x25 lfw_subset faces.
CAPTIONS: dict[str, str] = {
    "astronaut": (
        "a smiling astronaut in an orange spacesuit holding a black helmet, "
        "with the American flag and a model of the space shuttle behind her"
    ),
    "brick": "a grayscale photograph of a brick pavement seen at an angle, rows of long bricks",
    "camera": (
        "a black-and-white photograph of a man in a dark coat looking through a camera "
        "on a tripod in a grassy field, with buildings in the distance"
    ),
    "cell": (
        "a grayscale microscope image of a single round cell floating in saline, "
        "a bright disc on a grey background"
    ),
    "chelsea": "a close-up of a tabby cat's face with green eyes and a pink nose",
    "clock": "a motion-blurred grayscale photograph of a round clock against a plain grey wall",
    "coffee": "a cup of espresso on a red saucer with a silver spoon, on a wooden table",
    "coins": (
        "a grayscale photograph of ancient silver coins with heads and figures, "
        "laid out in four rows on a dark background"
    ),
    "grass": "a grayscale close-up of a lawn, dense blades of grass and small clover leaves",
    "gravel": "a grayscale close-up of a bed of sharp-edged gravel stones",
    "hubble_deep_field": (
        "the Hubble deep field, hundreds of small colourful galaxies on a black sky"
    ),
    "immunohistochemistry": (
        "a microscope image of stained tissue, brown-stained glands of cells "
        "with blue nuclei in pale connective tissue"
    ),
    "microaneurysms": "a grayscale close-up of a retina with dark blood vessels crossing it",
    "moon": "a grayscale photograph of the surface of the Moon with small craters",
    "page": (
        "a photograph of a printed book page headed Region-based segmentation, "
        "with a paragraph of text and a line of Python code"
    ),
    "retina": (
        "a colour photograph of the back of a human eye, an orange-red retina with "
        "branching blood vessels and the bright optic disc on the left"
    ),
    "rocket": (
        "a rocket standing on its launch pad at dusk between tall lattice towers, "
        "lit by starburst floodlights"
    ),
    "stereo_motorcycle": (
        "a red motorcycle parked in a garage, in front of shelves with cardboard boxes "
        "and a wooden bench"
    ),
    "text": (
        "a grayscale photograph of handwritten mathematical formulas on lined paper, "
        "seen at a low angle"
    ),
}


# scikit-learn's two sample photographs (`sklearn/datasets/images/NAME.jpg`), read as files.
SKLEARN_CAPTIONS: dict[str, str] = {
    "china": (
        "a tall Chinese temple tower with red and green painted tiers on a wooded hill above a lake"
    ),
    "flower": "a close-up of an orange dahlia flower in bloom against dark green leaves",
}


def _sklearn_image(name: str) -> Image.Image:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-learn is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images" / f"{name}.jpg"
    with Image.open(path) as image:
        return image.convert("RGB")


def load_photo(name: str) -> Image.Image:
    """Load one photograph as RGB, its long side resized to LONG_SIDE."""
    if name in SKLEARN_CAPTIONS:
        image = _sklearn_image(name)
    else:
        import skimage.data

        loaded = getattr(skimage.data, name)()
        array = np.asarray(loaded[0] if isinstance(loaded, tuple) else loaded)  # stereo: left
        if array.dtype != np.uint8:
            raise DatasetError(f"photos: {name} is {array.dtype}, expected uint8")
        image = Image.fromarray(array).convert("RGB")  # grayscale photos become RGB
    scale = LONG_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def build_photos(
    out: str | Path, limit: int | None = None, progress: bool = True
) -> DatasetSummary:
    """Write the captioned scikit-image photographs (sorted by name) into `out`."""
    writer = DatasetWriter(out, "photos")
    missing: list[str] = []
    captions = CAPTIONS | SKLEARN_CAPTIONS
    for name in tqdm(sorted(captions), desc="photos", unit="img", disable=not progress):
        if limit is not None and len(writer) >= limit:
            break
        try:
            image = load_photo(name)
        except (AttributeError, OSError, ImportError, ValueError) as e:
            # A scikit-image release without this file (or needing a download): skip it.
            logger.warning("photos: cannot load %s offline (%s); skipped", name, e)
            missing.append(name)
            continue
        writer.add(image, name, captions[name], {"name": name, "dataset": "photos"})
    if not len(writer):
        raise DatasetError(
            "photos: no scikit-image photograph could be loaded; "
            "install scikit-image (`pip install 'mmrag[data]'`)"
        )
    summary = writer.close()
    logger.info("photos: wrote %d, skipped %d (%s)", summary.count, len(missing), missing)
    return summary
