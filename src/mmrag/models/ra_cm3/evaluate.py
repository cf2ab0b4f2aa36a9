"""`mmrag eval ra-cm3`: does retrieval make generation better than the same model without it,
and better than just returning what was retrieved?

Scored on emoji variants held out of training whose siblings stay in the memory (or, with
`--split validation`, on the validation variants, on which decoding settings are chosen). Every
system draws and writes through the public `RACM3.generate_image` / `generate_caption` (what
`mmrag generate` and the server call), with the shipped decoding settings unless said:
- `ra-cm3`: the shipped decoding: retrieval, the gated copy interpolation (exact for what the
  memory holds), samples copying several retrieved images, captions composed from retrieved
  ones (model.py, compose.py);
- `generator alone`: the same weights and retrieved documents, no copy interpolation and no
  composition (copy weight 0);
- `ra-cm3 (no retrieval)`: the same weights with nothing retrieved;
- `vanilla`: the baseline trained with `--retrieval off`, identical steps and token budget;
- `copy 1`: copy weight 1 without composition: the top retrieved document through the VQ;
- `ra-cm3 + copy w` (`--copy-weight w`): the shipped decoding with copy weight w for images and
  captions (for choosing the weight on the validation variants);
- `retrieval only`: the top retrieved document's image / caption returned as the output.

Metrics: caption -> image FID (the declared EfficientNet-Lite0 extractor, mmrag.metrics.fid)
against the true images, the dual-encoder image-caption score, and **variant accuracy**: among
the captions of the variant's family (its siblings and itself), does the memory's dual encoder
rank the asked-for caption first for the drawn image? (The retrieval-only baseline returns a
sibling.) The dual encoder tells skin tones apart poorly (the true images themselves score
well under 1), so **variant accuracy (pixels)** asks the same of the pixels: among the images of
the variant's family, is the true variant's the nearest to the drawing (squared distance at
32 px)? A returned sibling is nearest to itself. Image -> caption: CIDEr-D and exact match
against the true caption.

Further tests: the **stored** test captions the images of documents the memory holds (exact
match) and draws their captions (share of drawings whose codes are the stored image's); the
**knowledge** test adds documents with made-up names to a copy of the memory after training and
draws each name (a hit: the nearest candidate image, on the FID extractor, is the paired one);
**infilling** masks the skin tone of held-out captions (`man surfing: <mask> skin tone`);
**in-context classification** pins one demonstration per class (the family's base emoji, whose
caption is the class name) and captions a held-out variant of one of them; **style** pins two
documents of one skin tone from other families and draws a third family's base caption: does
the dual encoder rank that family's variant of the pinned tone first?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmrag.config import ConfigError
from mmrag.documents import Document, load_image
from mmrag.encoders.base import l2_normalize
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory
from mmrag.metrics.captions import cider
from mmrag.metrics.fid import FID_EXTRACTOR, fid_features, frechet_distance
from mmrag.metrics.report import prepare, report
from mmrag.metrics.retrieval import dual_encoder_scores, nearest_is_right
from mmrag.models.ra_cm3.compose import spans_between
from mmrag.models.ra_cm3.data import CORPUS_FILE, Corpus
from mmrag.models.ra_cm3.model import MASK, RACM3, Evidence, ImageOutput, RACM3Config
from mmrag.models.vq.model import VQModel, square_resize

logger = logging.getLogger(__name__)

SYLLABLES = (
    "bla",
    "dro",
    "fen",
    "gor",
    "kip",
    "lum",
    "mox",
    "nar",
    "pel",
    "quo",
    "rin",
    "sav",
    "tuk",
    "vey",
    "wim",
    "zor",
)


def made_up_names(n: int, seed: int) -> list[str]:
    """`n` distinct pseudo-words of three syllables (never emoji names)."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < n:
        word = "".join(rng.choice(SYLLABLES, size=3))
        if word not in names:
            names.append(word)
    return names


def _load(path: str) -> Image.Image:
    return load_image(path)


@dataclasses.dataclass(frozen=True)
class Settings:
    n: int = 100  # held-out documents scored
    samples: int | None = None  # images per caption (reranked); None: the model's config
    caption_samples: int | None = None  # captions per image; None: the model's config
    guidance: float | None = None  # None: the model's config
    copy_weights: tuple[float, ...] = ()  # one `ra-cm3 + copy w` system each
    # one system each: the model with these decoding settings (RACM3Config fields) changed
    decodings: tuple[tuple[tuple[str, Any], ...], ...] = ()
    only: tuple[str, ...] = ()  # score only these systems (retrieval only is always scored)
    split: str = "heldout"  # the documents scored: "heldout" (test) or "validation"
    knowledge: int = 20  # made-up names
    stored: int = 20  # documents the memory holds, captioned and drawn
    infill: int = 20  # held-out captions with a skin tone, the tone masked
    icl: int = 20  # in-context classification episodes
    ways: int = 3  # classes (one pinned demonstration each) per episode
    style: int = 10  # style-control trials
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not all(0.0 <= w <= 1.0 for w in self.copy_weights):
            raise ConfigError(f"copy weights must be in [0, 1], got {list(self.copy_weights)}")
        if self.split not in ("heldout", "validation"):
            raise ConfigError(f"split must be 'heldout' or 'validation', got {self.split!r}")
        if self.ways < 2:
            raise ConfigError("ways must be >= 2")


# The Settings fields the command line sets, with their help (each flag's default is the field's).
SETTING_FLAGS = {
    "n": "held-out documents scored",
    "knowledge": "made-up names in the knowledge test, 0 skips it",
    "stored": "stored documents captioned and drawn in the stored test, 0 skips it",
    "infill": "held-out captions whose skin tone is masked and infilled, 0 skips it",
    "icl": "in-context classification episodes, 0 skips them",
    "ways": "classes per in-context classification episode",
    "style": "style-control trials, 0 skips them",
    "seed": "seed of names, episodes and sampling",
}
# Those that default to the model's own config.
MODEL_FLAGS = {
    "samples": (int, "images sampled per caption, reranked"),
    "caption_samples": (int, "captions sampled per image"),
    "guidance": (float, "classifier-free guidance scale"),
}


@dataclasses.dataclass(frozen=True)
class System:
    """One way of generating: a model and the arguments its generate_* calls get."""

    name: str
    model: RACM3
    retrieval: bool = True
    copy_weight: float | None = None  # images and captions; None: the model's gate
    compose: bool | None = None  # None: the model's config

    def draw(self, caption: str, settings: Settings, seed: int) -> ImageOutput:
        return self.model.generate_image(
            caption,
            settings.samples,
            settings.guidance,
            retrieval=self.retrieval,
            seed=seed,
            copy_weight=self.copy_weight,
        )

    def write(self, image: Image.Image, settings: Settings, seed: int) -> str:
        return self.model.generate_caption(
            image,
            settings.caption_samples,
            retrieval=self.retrieval,
            seed=seed,
            copy_weight=self.copy_weight,
            compose=self.compose,
        ).text


def systems(ra: RACM3, vanilla: RACM3, settings: Settings) -> list[System]:
    """The compared systems (module docstring), retrieval-only aside."""
    out = [
        System("ra-cm3", ra),
        System("generator alone", ra, copy_weight=0.0, compose=False),
        System("ra-cm3 (no retrieval)", ra, retrieval=False),
        System("vanilla", vanilla, retrieval=False),
        System("copy 1", ra, copy_weight=1.0, compose=False),
    ]
    out += [System(copied_name(w), ra, copy_weight=w) for w in copy_weights(settings)]
    for changes in settings.decodings:
        changed = ra.with_config(**dict(changes))
        out.append(System("ra-cm3 " + ", ".join(f"{k}={v}" for k, v in changes), changed))
    return out


def parse_decoding(text: str) -> tuple[tuple[str, Any], ...]:
    """`copy_weight=1,copy_sources=4` -> (("copy_weight", 1.0), ("copy_sources", 4)), typed as
    the RACM3Config fields they name."""
    fields = {f.name: f for f in dataclasses.fields(RACM3Config)}
    out = []
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields or key == "retriever":
            raise ConfigError(f"--decoding {text!r}: expected KEY=VALUE with RACM3Config keys")
        kind = type(getattr(RACM3Config(), key))
        try:
            typed = value.strip() == "true" if kind is bool else kind(value)
        except ValueError as e:
            raise ConfigError(f"--decoding {text!r}: {key} takes a {kind.__name__}") from e
        out.append((key, typed))
    return tuple(out)


def caption_to_image(
    system: System, captions: Sequence[str], settings: Settings, desc: str
) -> list[ImageOutput]:
    """Each caption drawn (sampling seed: settings.seed + its index)."""
    bar = tqdm(captions, desc=desc, disable=not settings.progress)
    return [system.draw(caption, settings, settings.seed + i) for i, caption in enumerate(bar)]


def image_to_caption(
    system: System, images: Sequence[Image.Image], settings: Settings, desc: str
) -> list[str]:
    """Each image captioned (sampling seed: settings.seed + its index)."""
    bar = tqdm(images, desc=desc, disable=not settings.progress)
    return [system.write(image, settings, settings.seed + i) for i, image in enumerate(bar)]


def top_documents(model: RACM3, captions: Sequence[str]) -> list[Evidence | None]:
    """The top document retrieval finds for each caption (what the retrieval-only baseline
    returns), None when it finds nothing."""
    return [next(iter(model.evidence(caption, None, k=1)), None) for caption in captions]


def top_document_codes(top: Sequence[Evidence | None], corpus: Corpus) -> list[list[int] | None]:
    """The codes of each top document, None where there is none or the corpus lacks it."""
    index = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    rows = [None if e is None else index.get(e.id) for e in top]
    return [None if row is None else corpus.codes[row].tolist() for row in rows]


def top_agreement(
    codes: Sequence[Sequence[int]], top: Sequence[Sequence[int] | None]
) -> float | None:
    """Mean share of image cells whose code is the top retrieved document's at that cell
    (captions without one skipped; None if none has one): how much of a drawing is a copy."""
    shares = [
        float(np.mean(np.asarray(c) == np.asarray(t)))
        for c, t in zip(codes, top, strict=True)
        if t is not None
    ]
    return float(np.mean(shares)) if shares else None


def retrieval_only(
    model: RACM3, top: Sequence[Evidence | None], images: Sequence[Image.Image]
) -> tuple[list[Image.Image], list[str]]:
    """The top retrieved document's image for each caption (`top`, from `top_documents`), its
    caption for each image."""
    drawn, written = [], []
    for found in top:
        blank = Image.new("RGB", (64, 64), "white")
        drawn.append(_load(found.image) if found and found.image else blank)
    for image in images:
        top_caption = model.evidence(None, image, k=1)
        written.append(top_caption[0].text if top_caption else "")
    return drawn, written


def family_rows(corpus: Corpus, rows: Sequence[int]) -> list[list[int]]:
    """For each row, the rows of its family (every document of its group, itself included,
    in corpus order), itself alone when it has no group."""
    members: dict[str, list[int]] = {}
    for j, group in enumerate(corpus.groups):
        if group is not None:
            members.setdefault(group, []).append(j)
    return [members[g] if (g := corpus.groups[i]) is not None else [i] for i in rows]


def families(corpus: Corpus, rows: Sequence[int]) -> list[list[str]]:
    """For each row, the captions of its family (`family_rows`)."""
    return [[corpus.captions[j] for j in family] for family in family_rows(corpus, rows)]


def variant_accuracy(
    encoder: Any,
    images: Sequence[Image.Image],
    wanted: Sequence[str],
    choices: Sequence[Sequence[str]],
) -> float:
    """Share of images for which the dual encoder ranks the wanted caption first among its
    choices (the variants of its family)."""
    if not images:
        return float("nan")
    seen = l2_normalize(encoder.encode_image(list(images)))
    hits = []
    for vector, want, options in zip(seen, wanted, choices, strict=True):
        texts = l2_normalize(encoder.encode_text(list(options)))
        hits.append(options[int(np.argmax(texts @ vector))] == want)
    return float(np.mean(hits))


PIXEL_SIDE = 32  # the side at which drawings are compared with the family's images


def pixel_rows(images: Sequence[Image.Image]) -> np.ndarray:
    """(N, PIXEL_SIDE ** 2 * 3) float pixels of the images, square-resized."""
    return np.stack(
        [np.asarray(square_resize(im, PIXEL_SIDE), np.float32).ravel() for im in images]
    )


def family_images(corpus: Corpus, rows: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """For each row, its family's images (`family_rows`) as `pixel_rows`, and where the row
    itself is among them."""
    cache: dict[int, np.ndarray] = {}
    out = []
    for i, family in zip(rows, family_rows(corpus, rows), strict=True):
        for j in family:
            if j not in cache:
                cache[j] = pixel_rows([_load(corpus.image_paths[j])])[0]
        out.append((np.stack([cache[j] for j in family]), family.index(i)))
    return out


def pixel_variant_accuracy(
    images: Sequence[Image.Image], families: Sequence[tuple[np.ndarray, int]]
) -> float:
    """Share of drawn images whose nearest image of their family, in squared pixel distance at
    PIXEL_SIDE pixels, is the asked-for variant's own (the retrieval-only baseline returns a
    sibling's, nearest to itself)."""
    if not images:
        return float("nan")
    drawn = pixel_rows(images)
    hits = [
        int(np.argmin(((family - row) ** 2).sum(1))) == own
        for row, (family, own) in zip(drawn, families, strict=True)
    ]
    return float(np.mean(hits))


def exact(written: Sequence[str], truth: Sequence[str]) -> float:
    return float(np.mean([w == t for w, t in zip(written, truth, strict=True)]))


def score_system(
    encoder: Any,
    drawn: Sequence[Image.Image],
    written: Sequence[str],
    captions: Sequence[str],
    choices: Sequence[Sequence[str]],
    reference_feats: np.ndarray,
    family_pixels: Sequence[tuple[np.ndarray, int]],
) -> dict[str, float | None]:
    return {
        "fid": frechet_distance(fid_features(drawn), reference_feats),
        "dual_encoder_score": float(dual_encoder_scores(encoder, drawn, captions).mean()),
        "variant_accuracy": variant_accuracy(encoder, drawn, captions, choices),
        "variant_accuracy_pixels": pixel_variant_accuracy(drawn, family_pixels),
        "cider": cider(written, [[c] for c in captions]),
        "exact": exact(written, captions),
    }


def copied_name(weight: float) -> str:
    return f"ra-cm3 + copy {weight:g}"


def copy_weights(settings: Settings) -> list[float]:
    """The copy weights that make extra systems, in order, once."""
    return list(dict.fromkeys(settings.copy_weights))


def knowledge_test(
    runs: Sequence[System],
    memory_dir: Path,
    corpus: Corpus,
    rows: Sequence[int],
    settings: Settings,
) -> dict[str, Any]:
    """New names added to a copy of the memory after training: the hit rate of the paired
    image when each name is drawn, and (the `ra-cm3` system) the share of the paired images
    captioned with one of the captions the memory holds for them."""
    candidates = [_load(corpus.image_paths[i]) for i in rows]
    cand_feats = fid_features(candidates)
    captions = [f"a {name}" for name in made_up_names(len(rows), settings.seed)]
    drawn: dict[str, list[ImageOutput]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "memory"
        shutil.copytree(memory_dir, copy)
        with Memory.open(copy, mode="a") as memory:
            docs = [
                Document.of(text=c, image=corpus.image_paths[i], metadata={"knowledge": True})
                for c, i in zip(captions, rows, strict=True)
            ]
            ingest(memory, docs, progress=False)
            for system in runs:
                updated = dataclasses.replace(system, model=system.model.with_memory(memory))
                drawn[system.name] = caption_to_image(updated, captions, settings, "knowledge")
                if system.name == "ra-cm3":
                    written = image_to_caption(updated, candidates, settings, "knowledge")
    right = list(range(len(rows)))
    hits: dict[str, Any] = {
        name: float(
            nearest_is_right(fid_features([o.image for o in outs]), cand_feats, right).mean()
        )
        for name, outs in drawn.items()
    }
    if "ra-cm3" in drawn:
        stored = [{c, corpus.captions[i]} for c, i in zip(captions, rows, strict=True)]
        hits["captioned_as_stored"] = float(
            np.mean([w in s for w, s in zip(written, stored, strict=True)])
        )
    return hits | {"chance": 1.0 / len(rows), "names": float(len(rows))}


def stored_test(
    runs: Sequence[System], corpus: Corpus, rows: Sequence[int], settings: Settings
) -> dict[str, dict[str, float]]:
    """Documents the memory holds: their images captioned (CIDEr-D, share written exactly as
    stored) and their captions drawn (share of drawings whose codes are all the stored
    image's, and the mean share of cells that are)."""
    images = [_load(corpus.image_paths[i]) for i in rows]
    truth = [corpus.captions[i] for i in rows]
    out: dict[str, dict[str, float]] = {}
    for system in runs:
        written = image_to_caption(system, images, settings, f"stored {system.name}")
        drawn = caption_to_image(system, truth, settings, f"stored {system.name}")
        same = [
            np.asarray(o.codes) == corpus.codes[i].numpy() for o, i in zip(drawn, rows, strict=True)
        ]
        out[system.name] = {
            "cider": cider(written, [[t] for t in truth]),
            "exact": exact(written, truth),
            "drawn_exactly": float(np.mean([s.all() for s in same])),
            "drawn_cells": float(np.mean([s.mean() for s in same])),
        }
    return out


# --- infilling, in-context classification and style -----------------------------------------

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
_TONE = re.compile(r": (" + "|".join(sorted(TONES, key=len, reverse=True)) + r") skin tone")


def masked_tone(caption: str) -> str | None:
    """The caption with its (first) skin tone masked, None without one."""
    found = _TONE.search(caption)
    if found is None:
        return None
    return caption[: found.start(1)] + MASK + caption[found.end(1) :]


def infill_test(
    runs: Sequence[System], corpus: Corpus, rows: Sequence[int], settings: Settings
) -> dict[str, Any]:
    """Caption infilling of the masked skin tone of held-out captions, on their images: the
    share filled exactly; `retrieval only` fills the span the top retrieved caption holds
    between the same words."""
    items = [(i, m) for i in rows if (m := masked_tone(corpus.captions[i])) is not None]
    items = items[: settings.infill]
    if not items:
        return {}
    truth = [corpus.captions[i] for i, _ in items]
    images = [_load(corpus.image_paths[i]) for i, _ in items]
    out: dict[str, Any] = {"items": len(items)}
    for system in runs:
        filled = [
            system.model.infill_caption(
                image,
                masked,
                retrieval=system.retrieval,
                samples=settings.caption_samples,
                seed=settings.seed + n,
                copy_weight=system.copy_weight,
                compose=system.compose,
            ).text
            for n, (image, (_, masked)) in enumerate(zip(images, items, strict=True))
        ]
        out[system.name] = exact(filled, truth)
    model = runs[0].model
    baseline = []
    for image, (_, masked) in zip(images, items, strict=True):
        left, right = masked.split(MASK)
        top = model.evidence(left.strip() or None, image, k=1)
        spans = spans_between([e.text for e in top], left, right)
        baseline.append(" ".join(f"{left.rstrip()} {spans[0] if spans else ''}{right}".split()))
    out["retrieval only"] = exact(baseline, truth)
    return out


def base_documents(corpus: Corpus, rows: Sequence[int], memory: Memory) -> dict[str, str]:
    """For the families of `rows`, the memory id of the family's base document (its shortest
    caption, the class name: `person surfing` for `woman surfing: dark skin tone`), where the
    memory holds it."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(corpus.groups):
        if group is not None:
            members.setdefault(group, []).append(i)
    out: dict[str, str] = {}
    for i in rows:
        group = corpus.groups[i]
        if group is None or group in out:
            continue
        base = min((j for j in members[group] if j != i), key=lambda j: len(corpus.captions[j]))
        if memory.get([corpus.ids[base]])[0] is not None:
            out[group] = corpus.ids[base]
    return out


def icl_test(ra: RACM3, corpus: Corpus, rows: Sequence[int], settings: Settings) -> dict[str, Any]:
    """In-context classification by captioning: each episode pins the base documents of
    `ways` families (one demonstration per class, shuffled) and captions a held-out variant of
    one of them; right if the caption is its class name. Against chance (1 / ways), nothing
    pinned or retrieved, and retrieval in place of the demonstrations."""
    assert ra.memory is not None
    bases = base_documents(corpus, rows, ra.memory)
    usable = [i for i in rows if corpus.groups[i] in bases]
    groups = sorted({g for i in usable if (g := corpus.groups[i]) is not None})
    if len(groups) < settings.ways:
        return {}
    rng = np.random.default_rng(settings.seed)
    names = {g: doc.text for g in groups if (doc := ra.memory.get([bases[g]])[0]) is not None}
    pinned_runs = {"pinned": None, "pinned, generator alone": False}
    hits: dict[str, list[bool]] = {k: [] for k in (*pinned_runs, "no demonstrations", "retrieval")}
    for episode in range(settings.icl):
        chosen = [str(g) for g in rng.choice(groups, size=settings.ways, replace=False)]
        target = chosen[int(rng.integers(settings.ways))]
        query = int(rng.choice([i for i in usable if corpus.groups[i] == target]))
        image, want = _load(corpus.image_paths[query]), names[target]
        demos = [bases[g] for g in chosen]
        seed = settings.seed + episode
        for name, compose in pinned_runs.items():
            out = ra.generate_caption(
                image,
                settings.caption_samples,
                demos=demos,
                seed=seed,
                compose=compose,
                copy_weight=None if compose is None else 0.0,
            )
            hits[name].append(out.text == want)
        alone = ra.generate_caption(image, settings.caption_samples, retrieval=False, seed=seed)
        hits["no demonstrations"].append(alone.text == want)
        found = ra.generate_caption(image, settings.caption_samples, seed=seed)
        hits["retrieval"].append(found.text == want)
    return {k: float(np.mean(v)) for k, v in hits.items()} | {
        "chance": 1.0 / settings.ways,
        "episodes": float(settings.icl),
        "ways": float(settings.ways),
    }


def style_test(ra: RACM3, corpus: Corpus, settings: Settings) -> dict[str, Any]:
    """Style control: pin two stored documents of one skin tone from two families and draw a
    third family's base caption; a hit when the dual encoder ranks that family's variant of
    the pinned tone first among the family's captions. Against chance (1 / the family's
    variants) and against drawing the base caption with retrieval."""
    assert ra.memory is not None
    toned: dict[str, dict[str, int]] = {}  # group -> tone -> row
    base: dict[str, int] = {}
    for i, (caption, group) in enumerate(zip(corpus.captions, corpus.groups, strict=True)):
        if group is None or ra.memory.get([corpus.ids[i]])[0] is None:
            continue
        found = _TONE.search(caption)
        if found and found.end() == len(caption):
            toned.setdefault(group, {})[found.group(1)] = i
        elif ":" not in caption:
            base[group] = i
    full = sorted(g for g, t in toned.items() if len(t) == len(TONES) and g in base)
    if len(full) < 3:
        return {}
    rng = np.random.default_rng(settings.seed)
    choices = families(corpus, [base[g] for g in full])
    options = dict(zip(full, choices, strict=True))
    hits: dict[str, list[bool]] = {"pinned": [], "retrieval": []}
    chance = []
    for trial in range(settings.style):
        first, second, third = (str(g) for g in rng.choice(full, size=3, replace=False))
        tone = str(rng.choice(TONES))
        demos = [corpus.ids[toned[first][tone]], corpus.ids[toned[second][tone]]]
        caption, want = corpus.captions[base[third]], corpus.captions[toned[third][tone]]
        seed = settings.seed + trial
        pinned = ra.generate_image(
            caption, settings.samples, settings.guidance, demos=demos, seed=seed
        )
        plain = ra.generate_image(caption, settings.samples, settings.guidance, seed=seed)
        for name, out in (("pinned", pinned), ("retrieval", plain)):
            hits[name].append(
                variant_accuracy(ra.memory.encoder, [out.image], [want], [options[third]]) == 1.0
            )
        chance.append(1.0 / len(options[third]))
    return {k: float(np.mean(v)) for k, v in hits.items()} | {
        "chance": float(np.mean(chance)),
        "trials": float(settings.style),
    }


# --- the evaluation --------------------------------------------------------------------------


def evaluate(
    ra_dir: Path,
    vanilla_dir: Path,
    memory_dir: Path | None,
    settings: Settings,
    vq_dir: Path | None = None,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """Every system on the first `settings.n` variants of `settings.split`; see the module
    docstring. `ra_dir` is the RA run (its split, corpus and memory); `model_dir` the RA-CM3
    model scored (default: the run's own; e.g. the shipped checkpoint, whose decoding settings
    were chosen after training). `vq_dir`: both models draw with that VQ (it must give their
    codes; see `RACM3.with_vq`)."""
    split = json.loads((ra_dir / "split.json").read_text(encoding="utf-8"))
    if not split.get(settings.split):
        raise ConfigError(
            f"{ra_dir / 'split.json'} has no {settings.split!r} documents"
            + (" (train ra-cm3 --validation makes them)" if settings.split == "validation" else "")
        )
    vanilla_split = json.loads((vanilla_dir / "split.json").read_text(encoding="utf-8"))
    if vanilla_split.get(settings.split) != split[settings.split]:
        raise ConfigError(f"{ra_dir} and {vanilla_dir} hold out different {settings.split} sets")
    rows = split[settings.split][: settings.n]
    corpus = Corpus.load(ra_dir / CORPUS_FILE)
    captions = [corpus.captions[i] for i in rows]
    choices = families(corpus, rows)
    family_pixels = family_images(corpus, rows)
    truth = [_load(corpus.image_paths[i]) for i in rows]
    reference = fid_features(truth)
    memory_dir = memory_dir or ra_dir / "memory"
    results: dict[str, dict[str, float | None]] = {}
    with Memory.open(memory_dir) as memory:
        ra = RACM3.from_pretrained(model_dir or ra_dir, memory)
        vanilla = RACM3.from_pretrained(vanilla_dir, memory)
        if vq_dir is not None:
            vq = VQModel.from_pretrained(vq_dir)
            ra, vanilla = ra.with_vq(vq), vanilla.with_vq(vq)
        runs = systems(ra, vanilla, settings)
        unknown = set(settings.only) - {r.name for r in runs}
        if unknown:
            raise ConfigError(f"--systems: no system named {sorted(unknown)}")
        runs = [r for r in runs if not settings.only or r.name in settings.only]
        top = top_documents(ra, captions)
        top_codes = top_document_codes(top, corpus)
        truth_agreement = top_agreement([corpus.codes[i].tolist() for i in rows], top_codes)
        for system in runs:
            drawn = caption_to_image(system, captions, settings, system.name)
            written = image_to_caption(system, truth, settings, system.name)
            images = [o.image for o in drawn]
            scores = score_system(
                memory.encoder, images, written, captions, choices, reference, family_pixels
            )
            scores["top_agreement"] = top_agreement([o.codes for o in drawn], top_codes)
            results[system.name] = scores
            logger.info("%s: %s", system.name, scores)
        returned, written = retrieval_only(ra, top, truth)
        results["retrieval only"] = score_system(
            memory.encoder, returned, written, captions, choices, reference, family_pixels
        )
        truth_variants = variant_accuracy(memory.encoder, truth, captions, choices)
        # the floor of any drawing: the true images through the VQ (their own codes decoded)
        true_codes = corpus.codes[rows].view(len(rows), ra.grid, ra.grid)
        vq_floor = frechet_distance(fid_features(ra.vq.decode_images(true_codes)), reference)
        core = [
            r
            for r in runs
            if r.name in ("ra-cm3", "generator alone", "ra-cm3 (no retrieval)", "vanilla")
        ]
        knowledge: dict[str, Any] = {}
        if settings.knowledge:
            step = max(1, len(split["train"]) // settings.knowledge)
            paired = split["train"][::step][: settings.knowledge]
            knowledge = knowledge_test(core, memory_dir, corpus, paired, settings)
        step = max(1, len(split["train"]) // max(1, settings.stored))
        kept = split["train"][step // 2 :: step][: settings.stored]
        stored = stored_test(core, corpus, kept, settings) if settings.stored else {}
        infill = infill_test(core[:2], corpus, rows, settings) if settings.infill and core else {}
        icl = icl_test(ra, corpus, rows, settings) if settings.icl else {}
        style = style_test(ra, corpus, settings) if settings.style else {}
    return {
        "systems": results,
        "knowledge": knowledge,
        "stored": stored,
        "infill": infill,
        "icl": icl,
        "style": style,
        "heldout_documents": len(rows),
        "split": settings.split,
        "truth_top_agreement": truth_agreement,
        "truth_variant_accuracy": truth_variants,
        "true_codes_fid": vq_floor,
        "fid_extractor": FID_EXTRACTOR,
        "settings": dataclasses.asdict(settings),
        "decoding": ra.config.to_dict(),
        "models": {
            "ra": str(model_dir or ra_dir),
            "run": str(ra_dir),
            "vanilla": str(vanilla_dir),
            "memory": str(memory_dir),
            "vq": str(vq_dir or "the models' own"),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The results tables for docs/results.md."""
    lines = [
        f"| system | FID ({FID_EXTRACTOR}) ↓ | dual-encoder score | variant accuracy "
        "| variant accuracy (pixels) | CIDEr-D | exact | knowledge hits "
        "| codes as the top retrieved image's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    knowledge = result["knowledge"]

    def share(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    for name, m in result["systems"].items():
        hits = knowledge.get(name)
        cell = f"{hits:.2f}" if hits is not None else "-"
        lines.append(
            f"| {name} | {m['fid']:.1f} | {m['dual_encoder_score']:.3f} | "
            f"{m['variant_accuracy']:.2f} | {m['variant_accuracy_pixels']:.2f} | "
            f"{100 * m['cider']:.1f} | {m['exact']:.2f} | {cell} | "
            f"{share(m.get('top_agreement'))} |"
        )
    kind = "validation" if result.get("split") == "validation" else "held-out"
    told = f"\n{result['heldout_documents']} {kind} emoji variants"
    told += f"; the true images' variant accuracy: {result['truth_variant_accuracy']:.2f}"
    if result.get("true_codes_fid") is not None:
        told += f", FID of their own VQ codes decoded: {result['true_codes_fid']:.1f}"
    if result.get("truth_top_agreement") is not None:
        told += (
            f"; the true images hold the top retrieved image's code at "
            f"{share(result['truth_top_agreement'])} of their cells"
        )
    if knowledge:
        told += f"; knowledge test: {int(knowledge['names'])} made-up names"
        told += f", chance {knowledge['chance']:.2f}"
        if "captioned_as_stored" in knowledge:
            told += f", their images captioned as stored {knowledge['captioned_as_stored']:.2f}"
    lines.append(told + ".")
    stored = result.get("stored") or {}
    if stored:
        lines += [
            "\n| stored documents | caption CIDEr-D | captioned exactly | drawn exactly "
            "| cells drawn as stored |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {100 * m['cider']:.1f} | {m['exact']:.2f} | {m['drawn_exactly']:.2f} "
            f"| {m['drawn_cells']:.2f} |"
            for name, m in stored.items()
        ]
    tests = [
        ("infill", "skin tone infilled exactly", "items"),
        ("icl", "in-context classification accuracy", "episodes"),
        ("style", "style control: pinned tone followed", "trials"),
    ]
    for key, title, count in tests:
        block = result.get(key) or {}
        if block:
            cells = ", ".join(
                f"{name} {value:.2f}"
                for name, value in block.items()
                if name != count and name not in ("ways",)
            )
            lines.append(f"\n{title} ({int(block[count])} {count}): {cells}.")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="mmrag eval ra-cm3",
        description="RA-CM3 against the generator alone, the same weights without retrieval, "
        "the vanilla model (same compute) and retrieval only, on held-out emoji variants: "
        "caption -> image FID, dual-encoder score and variant accuracy, image -> caption "
        "CIDEr-D and exact match; stored documents, the knowledge test, infilling, in-context "
        "classification and style control.",
    )
    p.add_argument(
        "--ra",
        required=True,
        type=Path,
        help="RA-CM3 run folder (train ra-cm3 --out): its split, corpus and memory",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="the RA-CM3 model folder scored (default: the run's own), e.g. checkpoints/ra-cm3",
    )
    p.add_argument(
        "--vanilla", required=True, type=Path, help="vanilla run folder (--retrieval off)"
    )
    p.add_argument("--memory", type=Path, help="memory to retrieve from (default: RA/memory)")
    p.add_argument(
        "--vq",
        type=Path,
        help="draw with this VQ instead of the models' own; it must give the same codes (same "
        "encoder and codebook, e.g. a decoder refined with train vq --decoder-only)",
    )
    for name, text in SETTING_FLAGS.items():
        default = getattr(d, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{text} (default {default})",
        )
    for name, (kind, text) in MODEL_FLAGS.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, help=f"{text} (default: the model's)"
        )
    p.add_argument(
        "--copy-weight",
        dest="copy_weights",
        type=float,
        nargs="+",
        default=list(d.copy_weights),
        help="copy weights for images and captions: one ra-cm3 + copy w system each (for "
        "choosing the weight on the validation split; default none)",
    )
    p.add_argument(
        "--split",
        choices=("heldout", "validation"),
        default=d.split,
        help="score the held-out (test) variants or the validation ones (train ra-cm3 "
        "--validation), on which decoding settings are chosen (default heldout)",
    )
    p.add_argument(
        "--decoding",
        dest="decodings",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="one more system: the RA-CM3 model with these decoding settings changed (its "
        "config.json keys, e.g. copy_weight=1,copy_sources=4,analogy_k=0); repeatable",
    )
    p.add_argument(
        "--systems",
        nargs="+",
        default=[],
        metavar="NAME",
        help="score only these systems (e.g. ra-cm3 'generator alone'; retrieval only always)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/eval-ra-cm3.json"), help="results JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prepare(args.threads)
    chosen = {name: getattr(args, name) for name in (*SETTING_FLAGS, *MODEL_FLAGS)}
    settings = Settings(
        **chosen,
        copy_weights=tuple(args.copy_weights),
        decodings=tuple(parse_decoding(d) for d in args.decodings),
        only=tuple(args.systems),
        split=args.split,
        progress=not args.no_progress,
    )
    result = evaluate(args.ra, args.vanilla, args.memory, settings, args.vq, args.model)
    report(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
