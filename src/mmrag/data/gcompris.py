"""The `gcompris` data set: photographs and drawings from Debian's `gcompris-qt-data`.

GCompris (an educational suite for children) keeps each activity's files in a Qt resource
archive (`/usr/share/gcompris-qt/rcc/NAME.rcc`). Several activities hold pictures named by
what they show: photographs of tools, household objects, fish, animals, dams and monuments
(`categorization`, `erase`, `explore_*_animals`) and drawings of animals, fruit and body parts
(`lang`'s word images). They are the only real photographs of everyday things that ship
offline here, so they are the real-image set the encoder is chosen on.

Captions are the file names made readable (`measuringTape3` -> `measuring tape`,
`northern_harrier` -> `northern harrier`): a trailing number goes, `_` and camelCase become
spaces. Word images that show an abstract word rather than a thing (colours and numbers,
drawn as paint pots and digits) are left out, as are paintings, maps and game pieces (other
activities). The `category` metadata key (the caption: the kind of thing shown) is the
group to hold out, so the nine hammers are held out together. The same picture used by two
activities is kept once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from mmrag.data.writer import (
    DatasetError,
    DatasetSummary,
    DatasetWriter,
    debian_version,
    flattened,
)

logger = logging.getLogger(__name__)

ROOT = Path("/usr/share/gcompris-qt/rcc")
DEBIAN_PACKAGE = "gcompris-qt-data"
CHANGELOG = Path("/usr/share/doc/gcompris-qt-data/changelog.Debian.gz")
LICENCE = (
    "GPL-3.0-or-later, GCompris's data (some pictures CC-BY-SA from Wikimedia Commons); "
    "see /usr/share/doc/gcompris-qt-data/copyright"
)
LONG_SIDE = 256
MIN_SIDE = 64
IMAGE_SUFFIXES = (".webp", ".png", ".jpg", ".jpeg")
# activity -> the resource folders whose file names say what the picture shows
ACTIVITIES: dict[str, tuple[str, ...]] = {
    "categorization": ("fishes", "others", "renewable", "tools", "monuments"),
    "erase": ("resource",),
    "explore_farm_animals": ("animals",),
    "explore_world_animals": ("animals",),
    "lang": ("words_sample",),
    "solar_system": ("resource",),
}
# The folder name is the better caption where the files are numbered (`fish12`).
FOLDER_CAPTIONS = {"fishes": "fish"}
# Names made plainer (`solar1` is a field of solar panels).
RENAMED = {"solar": "solar panels", "plier": "pliers", "screw driver": "screwdriver"}
# Word images of abstract words: colours drawn as paint pots, numbers as digits.
COLOURS = ("black", "blue", "brown", "color", "gray", "green", "mauve", "orange-color", "pink")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ABSTRACT_WORDS = frozenset(
    [*COLOURS, "red", "white", "yellow", *NUMBERS, "eleven", "twelve", "sixteen"]
)
# Files that show something else than their name (a backdrop, the activity's own icon).
SKIPPED_STEMS = frozenset(["background", "sea1", "sea2", "sea3", "sea4", "sea5", "sea6", "teeth"])

_RCC_MAGIC = b"qres"
_COMPRESSED_ZLIB = 0x01
_DIRECTORY = 0x02
_COMPRESSED_ZSTD = 0x04
_TRAILING_NUMBER = re.compile(r"[_-]?\d+$")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


class ResourceError(ValueError):
    """A file is not a Qt resource archive this reader understands."""


@dataclass(frozen=True)
class Resource:
    path: PurePosixPath
    data: bytes


def read_rcc(path: Path) -> Iterator[Resource]:
    """The files of a Qt binary resource archive (`rcc --binary`, format versions 1-3).

    Layout (Qt's `rcc.cpp`): a header (`qres`, version, then the offsets of the tree, the
    data and the names, all big-endian u32), a tree of 14-byte (v1) or 22-byte (v2+) nodes
    (name offset, flags, then a directory's child count and first child, or a file's locale
    and data offset), names as u16 length + u32 hash + UTF-16BE, and each file's data as a
    u32 size then the bytes (zlib-compressed ones start with their u32 uncompressed size).
    Zstandard-compressed entries are skipped with a warning.
    """
    blob = path.read_bytes()
    if len(blob) < 20 or blob[:4] != _RCC_MAGIC:
        raise ResourceError(f"{path}: not a Qt resource archive (no 'qres' header)")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    if not 1 <= version <= 3:
        raise ResourceError(f"{path}: resource format version {version} is not supported")
    node_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        start = names + offset
        (length,) = struct.unpack(">H", blob[start : start + 2])
        return blob[start + 6 : start + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, parent: PurePosixPath, depth: int) -> Iterator[Resource]:
        if depth > 64:
            raise ResourceError(f"{path}: the resource tree is deeper than 64 levels")
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", blob[at : at + 6])
        here = parent / name_at(name_offset) if index else parent
        if flags & _DIRECTORY:
            count, first = struct.unpack(">II", blob[at + 6 : at + 14])
            for child in range(first, first + count):
                yield from walk(child, here, depth + 1)
            return
        (offset,) = struct.unpack(">I", blob[at + 10 : at + 14])
        start = data + offset
        (size,) = struct.unpack(">I", blob[start : start + 4])
        raw = blob[start + 4 : start + 4 + size]
        if flags & _COMPRESSED_ZSTD:
            logger.warning("%s: %s is zstd-compressed; skipped", path.name, here)
            return
        if flags & _COMPRESSED_ZLIB:
            raw = zlib.decompress(raw[4:])
        yield Resource(here, raw)

    try:
        yield from walk(0, PurePosixPath("/"), 0)
    except (struct.error, zlib.error, UnicodeDecodeError, RecursionError) as e:
        raise ResourceError(f"{path}: damaged resource archive ({e})") from e


def readable_name(stem: str) -> str:
    """`measuringTape3` -> `measuring tape`; `northern_harrier` -> `northern harrier`."""
    stem = _TRAILING_NUMBER.sub("", stem)
    words = _CAMEL.sub(" ", stem.replace("_", " ").replace("-", " ")).lower().split()
    return " ".join(w for w in words if not w.isdigit())


def caption_for(activity: str, folder: str, stem: str) -> str | None:
    """The picture's caption, or None when its name does not say what it shows."""
    if stem in SKIPPED_STEMS or (activity == "lang" and stem in ABSTRACT_WORDS):
        return None
    name = FOLDER_CAPTIONS.get(folder) or readable_name(stem)
    return RENAMED.get(name, name) or None


def load_picture(data: bytes) -> Image.Image:
    """RGB on white (transparency flattened), long side `LONG_SIDE` (never enlarged)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgba = image.convert("RGBA")
    if min(rgba.size) < MIN_SIDE:
        raise ValueError(f"{rgba.width} x {rgba.height} px is smaller than {MIN_SIDE} px")
    return flattened(rgba, LONG_SIDE)


def pictures(root: Path) -> Iterator[tuple[str, str, PurePosixPath, bytes]]:
    """(activity, folder, resource path, bytes) of every picture the kept folders hold, in
    archive then path order."""
    for activity, folders in ACTIVITIES.items():
        archive = root / f"{activity}.rcc"
        if not archive.is_file():
            logger.warning("gcompris: %s is missing; its pictures are skipped", archive)
            continue
        try:
            found = sorted(read_rcc(archive), key=lambda r: str(r.path))
        except (OSError, ResourceError) as e:
            logger.warning("gcompris: %s; its pictures are skipped", e)
            continue
        for resource in found:
            folder = resource.path.parent.name
            if folder in folders and resource.path.suffix.lower() in IMAGE_SUFFIXES:
                yield activity, folder, resource.path, resource.data


def build_gcompris(
    out: str | Path, limit: int | None = None, progress: bool = True, root: Path = ROOT
) -> DatasetSummary:
    """Write the captioned pictures of the GCompris archives under `root` into `out`."""
    if not root.is_dir():
        raise DatasetError(f"{root} is missing; install it with `apt-get install {DEBIAN_PACKAGE}`")
    source = f"{DEBIAN_PACKAGE} {debian_version(CHANGELOG)} (Debian)"
    writer = DatasetWriter(out, "gcompris")
    seen: set[bytes] = set()
    skipped = {"unnamed": 0, "unreadable": 0, "repeated": 0}
    for activity, folder, path, data in tqdm(
        list(pictures(root)), desc="gcompris", unit="img", disable=not progress
    ):
        if limit is not None and len(writer) >= limit:
            break
        caption = caption_for(activity, folder, path.stem)
        if caption is None:
            skipped["unnamed"] += 1
            continue
        try:
            image = load_picture(data)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            logger.warning("gcompris: cannot use %s (%s); skipped", path, e)
            skipped["unreadable"] += 1
            continue
        pixels = hashlib.sha256(image.tobytes()).digest()
        if pixels in seen:
            skipped["repeated"] += 1
            continue
        seen.add(pixels)
        meta = {
            "dataset": "gcompris",
            "activity": activity,
            "category": caption,
            "file": f"{activity}.rcc:{path}",
            "source": source,
            "licence": LICENCE,
        }
        writer.add(image, f"{activity}--{folder}--{path.stem}", caption, meta)
    summary = writer.close()
    logger.info("gcompris: wrote %d pictures; skipped %s", summary.count, skipped)
    return summary
