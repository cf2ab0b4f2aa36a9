"""Where shipped checkpoints live: `$MMRAG_CHECKPOINTS`, then the ones inside the package.

The repository keeps them in `checkpoints/`; `src/mmrag/_checkpoints` is a link to it, so an
editable install reads them in place and a wheel carries them as package data (the same
relative path), and the lookup is one path in both cases."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MMRAG_CHECKPOINTS"
PACKAGED_CHECKPOINTS = Path(__file__).resolve().parent / "_checkpoints"

# The command that produces each shipped checkpoint, for the error message when it is missing.
PRODUCERS: dict[str, str] = {
    "lite-encoder": (
        "mmrag data emoji .cache/data/emoji && mmrag data photos .cache/data/photos && "
        "mmrag train encoder --data .cache/data/emoji .cache/data/photos "
        "--out checkpoints/lite-encoder --holdout 0 --seed 0 --epochs 30 --batch-size 1024"
    ),
    "vq": (
        "mmrag data emoji .cache/data/emoji && mmrag data photos .cache/data/photos && "
        "mmrag train vq --data .cache/data/emoji .cache/data/photos --out .cache/runs/vq-small "
        "--preset small --steps 4000 --batch-size 16 --lr 3e-4 --seed 0 --threads 1, then "
        "mmrag train vq --data (the same) --out .cache/runs/vq-refined --init "
        ".cache/runs/vq-small --decoder-only --pixel-loss l1 --perceptual-weight 0.3 "
        "--adversarial-weight 0.1 --lr 1e-4 --steps 1000 --batch-size 16 --seed 0 --threads 1 "
        "and copy it to checkpoints/vq (see checkpoints/vq/RECIPE.md)"
    ),
    "ra-cm3": (
        "mmrag data emoji .cache/data/emoji && mmrag train ra-cm3 --data .cache/data/emoji "
        "--out .cache/runs/ra-cm3 --preset small --copy-hints on --text-hints on "
        "--same-document 0.15 --steps 900 --seed 0 --threads 1, the same with --steps 2400, "
        "then copy its generator/, "
        "tokenizer/ and config.json to checkpoints/ra-cm3 (see checkpoints/ra-cm3/RECIPE.md)"
    ),
    "fromage": (
        "mmrag train fromage --data .cache/data/emoji .cache/data/photos --out "
        ".cache/runs/fromage --steps 300 --stop-after 100, then --steps 100, and copy the "
        "folder to checkpoints/fromage (see checkpoints/fromage/RECIPE.md)"
    ),
    "chat": (
        "mmrag train chat --data .cache/data/emoji .cache/data/photos --out checkpoints/chat "
        "(needs checkpoints/fromage; see checkpoints/chat/RECIPE.md)"
    ),
    "gill": (
        "mmrag train gill --data .cache/data/emoji .cache/data/photos --out checkpoints/gill "
        "(needs checkpoints/fromage and checkpoints/ra-cm3; see checkpoints/gill/RECIPE.md)"
    ),
}


class CheckpointNotFoundError(FileNotFoundError):
    """A named checkpoint is in none of the search roots."""


def search_roots() -> list[Path]:
    """The folders searched, in order: each entry of `$MMRAG_CHECKPOINTS` (os.pathsep-separated),
    then the packaged checkpoints."""
    roots = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*roots, PACKAGED_CHECKPOINTS]


def checkpoint_dir(name: str) -> Path:
    """The folder `name` (holding a `config.json`) in the first search root that has it."""
    if not name or Path(name).name != name:
        raise ValueError(f"a checkpoint name is a plain folder name, got {name!r}")
    roots = search_roots()
    for root in roots:
        candidate = root / name
        if (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(str(r / name) for r in roots)
    how = PRODUCERS.get(name)
    hint = f" Produce it with: {how}" if how else ""
    raise CheckpointNotFoundError(
        f"checkpoint {name!r} not found (looked in {looked}); set ${ENV_VAR} to a folder "
        f"that contains {name}/config.json.{hint}"
    )
