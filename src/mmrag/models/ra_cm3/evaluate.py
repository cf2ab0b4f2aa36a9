"""`mmrag eval ra-cm3`: does retrieval help? RA-CM3 against the vanilla model trained with the
same compute, on emoji variants held out of training whose siblings stay in the memory.

Systems, each on the same held-out documents:
- `ra-cm3`: the retrieval-augmented model, retrieving K = 2 from the memory of training
  documents (the held-out variants are not in it; their siblings are), the generator alone;
- `ra-cm3 + copy w`: the same, with the copy interpolation on image codes (decoding.py:
  each code drawn from (1 - w) * the model + w * the top retrieved image's code at that cell);
  its captions are `ra-cm3`'s (the interpolation is on image codes only);
- `ra-cm3 (no retrieval)`: the same weights with nothing retrieved (an ablation);
- `vanilla`: the baseline trained with `--retrieval off`, identical steps and tokens;
- `retrieval only`: the top retrieved document's image / caption returned as the output
  (the paper's retrieval baseline).

`--split validation` scores the validation variants instead (`train ra-cm3 --validation`:
other families' variants, also out of training and memory), on which decoding settings such
as the copy weight are chosen, so that the held-out (test) variants only report.

Metrics: caption -> image FID (on the declared EfficientNet-Lite0 extractor, see
mmrag.metrics.fid) against the held-out ground-truth images, and the `lite` dual-encoder
image-caption score; image -> caption CIDEr-D against the true caption. The knowledge test
adds documents whose names the model never saw ("a <made-up word>", each paired with an
existing image) to a copy of the memory *after* training, then draws each name: a hit is a
generated image whose nearest candidate image (same extractor, cosine) is the paired one.
The stored test captions images of training documents, which the memory holds: CIDEr-D and
the share of captions written exactly as stored (retrieval finds the document itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory
from mmrag.metrics.captions import cider
from mmrag.metrics.fid import FID_EXTRACTOR, fid_features, frechet_distance
from mmrag.metrics.report import prepare, report
from mmrag.metrics.retrieval import dual_encoder_scores, nearest_is_right
from mmrag.models.ra_cm3.data import CORPUS_FILE, Corpus
from mmrag.models.ra_cm3.model import RACM3, Evidence, ImageOutput
from mmrag.models.vq.model import VQModel

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
    samples: int = 2  # images per caption (reranked by the dual encoder)
    caption_samples: int = 4  # captions per image (reranked by perplexity)
    guidance: float = 3.0
    copy_weights: tuple[float, ...] = (0.5,)  # one `ra-cm3 + copy w` system each; 0s are left out
    split: str = "heldout"  # the documents scored: "heldout" (test) or "validation"
    knowledge: int = 20  # made-up names
    stored: int = 20  # images of documents the memory holds, captioned
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not all(0.0 <= w <= 1.0 for w in self.copy_weights):
            raise ConfigError(f"copy weights must be in [0, 1], got {list(self.copy_weights)}")
        if self.split not in ("heldout", "validation"):
            raise ConfigError(f"split must be 'heldout' or 'validation', got {self.split!r}")


# The Settings fields the command line sets, with their help (each flag's default is the field's).
SETTING_FLAGS = {
    "n": "held-out documents scored",
    "samples": "images sampled per caption, reranked",
    "caption_samples": "captions sampled per image, reranked",
    "guidance": "classifier-free guidance scale",
    "knowledge": "made-up names in the knowledge test, 0 skips it",
    "stored": "stored documents captioned in the stored test, 0 skips it",
    "seed": "seed of names and sampling",
}


def caption_to_image(
    model: RACM3,
    captions: Sequence[str],
    retrieval: bool,
    settings: Settings,
    desc: str,
    copy_weight: float = 0.0,
) -> list[ImageOutput]:
    return [
        model.generate_image(
            caption,
            settings.samples,
            settings.guidance,
            retrieval=retrieval,
            seed=settings.seed + i,
            copy_weight=copy_weight,
        )
        for i, caption in enumerate(tqdm(captions, desc=desc, disable=not settings.progress))
    ]


def top_documents(model: RACM3, captions: Sequence[str]) -> list[Evidence | None]:
    """The top document retrieval finds for each caption (the one the copy interpolation
    follows and the retrieval-only baseline returns), None when it finds nothing."""
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


def image_to_caption(
    model: RACM3, images: Sequence[Image.Image], retrieval: bool, settings: Settings, desc: str
) -> list[str]:
    return [
        model.generate_caption(
            image, settings.caption_samples, retrieval=retrieval, seed=settings.seed + i
        ).text
        for i, image in enumerate(tqdm(images, desc=desc, disable=not settings.progress))
    ]


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
        top = model.evidence(None, image, k=1)
        written.append(top[0].text if top else "")
    return drawn, written


def score_system(
    encoder: Any,
    drawn: Sequence[Image.Image],
    written: Sequence[str],
    captions: Sequence[str],
    reference_feats: np.ndarray,
) -> dict[str, float | None]:
    return {
        "fid": frechet_distance(fid_features(drawn), reference_feats),
        "dual_encoder_score": float(dual_encoder_scores(encoder, drawn, captions).mean()),
        "cider": cider(written, [[c] for c in captions]),
    }


def copied_name(weight: float) -> str:
    return f"ra-cm3 + copy {weight:g}"


def copy_weights(settings: Settings) -> list[float]:
    """The copy interpolation weights that make systems: the non-zero ones, in order, once."""
    return [w for w in dict.fromkeys(settings.copy_weights) if w]


def knowledge_test(
    model: RACM3,
    vanilla: RACM3,
    memory_dir: Path,
    corpus: Corpus,
    rows: Sequence[int],
    settings: Settings,
) -> dict[str, float]:
    """New names added to a copy of the memory after training; hit rate of the paired image."""
    candidates = [_load(corpus.image_paths[i]) for i in rows]
    cand_feats = fid_features(candidates)
    captions = [f"a {name}" for name in made_up_names(len(rows), settings.seed)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "memory"
        shutil.copytree(memory_dir, copy)
        with Memory.open(copy, mode="a") as memory:
            docs = [
                Document.of(text=c, image=corpus.image_paths[i], metadata={"knowledge": True})
                for c, i in zip(captions, rows, strict=True)
            ]
            ingest(memory, docs, progress=False)
            updated = model.with_memory(memory)
            runs = {"ra-cm3": caption_to_image(updated, captions, True, settings, "knowledge ra")}
            for w in copy_weights(settings):
                runs[copied_name(w)] = caption_to_image(
                    updated, captions, True, settings, "knowledge copy", w
                )
            runs["ra-cm3 (no retrieval)"] = caption_to_image(
                updated, captions, False, settings, "knowledge no retrieval"
            )
            runs["vanilla"] = caption_to_image(
                vanilla.with_memory(memory), captions, False, settings, "knowledge vanilla"
            )
    right = list(range(len(rows)))
    hits = {
        name: float(
            nearest_is_right(fid_features([o.image for o in outs]), cand_feats, right).mean()
        )
        for name, outs in runs.items()
    }
    return hits | {"chance": 1.0 / len(rows), "names": float(len(rows))}


def stored_test(
    systems: Sequence[tuple[str, RACM3, bool]],
    corpus: Corpus,
    rows: Sequence[int],
    settings: Settings,
) -> dict[str, dict[str, float]]:
    """Image -> caption of documents the memory holds: CIDEr-D against the stored caption
    and the share written exactly as stored."""
    images = [_load(corpus.image_paths[i]) for i in rows]
    truth = [corpus.captions[i] for i in rows]
    out: dict[str, dict[str, float]] = {}
    for name, model, retrieval in systems:
        written = image_to_caption(model, images, retrieval, settings, f"stored {name}")
        exact = np.mean([w == t for w, t in zip(written, truth, strict=True)])
        out[name] = {"cider": cider(written, [[t] for t in truth]), "exact": float(exact)}
    return out


def evaluate(
    ra_dir: Path,
    vanilla_dir: Path,
    memory_dir: Path | None,
    settings: Settings,
    vq_dir: Path | None = None,
) -> dict[str, Any]:
    """Every system on the first `settings.n` variants of `settings.split`; see the module
    docstring. `vq_dir`: both models draw with that VQ (it must give their codes; see
    `RACM3.with_vq`)."""
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
    truth = [_load(corpus.image_paths[i]) for i in rows]
    reference = fid_features(truth)
    memory_dir = memory_dir or ra_dir / "memory"
    results: dict[str, dict[str, float | None]] = {}
    with Memory.open(memory_dir) as memory:
        ra = RACM3.from_pretrained(ra_dir, memory)
        vanilla = RACM3.from_pretrained(vanilla_dir, memory)
        if vq_dir is not None:
            vq = VQModel.from_pretrained(vq_dir)
            ra, vanilla = ra.with_vq(vq), vanilla.with_vq(vq)
        runs = [
            ("ra-cm3", ra, True),
            ("ra-cm3 (no retrieval)", ra, False),
            ("vanilla", vanilla, False),
        ]
        top = top_documents(ra, captions)
        top_codes = top_document_codes(top, corpus)
        truth_agreement = top_agreement([corpus.codes[i].tolist() for i in rows], top_codes)

        def score(name: str, drawn: Sequence[ImageOutput], written: Sequence[str]) -> None:
            images = [o.image for o in drawn]
            results[name] = score_system(memory.encoder, images, written, captions, reference)
            results[name]["top_agreement"] = top_agreement([o.codes for o in drawn], top_codes)
            logger.info("%s: %s", name, results[name])

        for name, model, retrieval in runs:
            drawn = caption_to_image(model, captions, retrieval, settings, name)
            written = image_to_caption(model, truth, retrieval, settings, name)
            score(name, drawn, written)
            for w in copy_weights(settings) if name == "ra-cm3" else ():
                copied = copied_name(w)  # the same captions, copied images
                score(copied, caption_to_image(model, captions, True, settings, copied, w), written)
        returned, written = retrieval_only(ra, top, truth)
        results["retrieval only"] = score_system(
            memory.encoder, returned, written, captions, reference
        )
        knowledge: dict[str, float] = {}
        if settings.knowledge:
            step = max(1, len(split["train"]) // settings.knowledge)
            paired = split["train"][::step][: settings.knowledge]
            knowledge = knowledge_test(ra, vanilla, memory_dir, corpus, paired, settings)
        step = max(1, len(split["train"]) // max(1, settings.stored))
        kept = split["train"][step // 2 :: step][: settings.stored]
        stored = stored_test(runs, corpus, kept, settings) if settings.stored else {}
    return {
        "systems": results,
        "knowledge": knowledge,
        "stored": stored,
        "heldout_documents": len(rows),
        "split": settings.split,
        "truth_top_agreement": truth_agreement,
        "fid_extractor": FID_EXTRACTOR,
        "settings": dataclasses.asdict(settings),
        "models": {
            "ra": str(ra_dir),
            "vanilla": str(vanilla_dir),
            "memory": str(memory_dir),
            "vq": str(vq_dir or "the models' own"),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The results table for docs/results.md."""
    lines = [
        f"| system | FID ({FID_EXTRACTOR}) lower is better | dual-encoder score | CIDEr-D "
        "| knowledge hits | codes as the top retrieved image's |",
        "|---|---|---|---|---|---|",
    ]
    knowledge = result["knowledge"]

    def share(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    for name, m in result["systems"].items():
        hits = knowledge.get(name)
        cell = f"{hits:.2f}" if hits is not None else "-"
        lines.append(
            f"| {name} | {m['fid']:.1f} | {m['dual_encoder_score']:.3f} | "
            f"{100 * m['cider']:.1f} | {cell} | {share(m.get('top_agreement'))} |"
        )
    kind = "validation" if result.get("split") == "validation" else "held-out"
    told = f"\n{result['heldout_documents']} {kind} emoji variants"
    if result.get("truth_top_agreement") is not None:
        told += (
            f"; the true images hold the top retrieved image's code at "
            f"{share(result['truth_top_agreement'])} of their cells"
        )
    if knowledge:
        told += f"; knowledge test: {int(knowledge['names'])} made-up names"
        told += f", chance {knowledge['chance']:.2f}"
    lines.append(told + ".")
    stored = result.get("stored") or {}
    if stored:
        lines += [
            "\n| image -> caption of a stored document | CIDEr-D | written exactly |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} | {100 * m['cider']:.1f} | {m['exact']:.2f} |" for name, m in stored.items()
        ]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="mmrag eval ra-cm3",
        description="RA-CM3 vs the vanilla model (same compute) on held-out emoji variants: "
        "caption -> image FID (EfficientNet-Lite0 features) and dual-encoder score, "
        "image -> caption CIDEr-D, and the knowledge test (names added after training).",
    )
    p.add_argument("--ra", required=True, type=Path, help="RA-CM3 run folder (train ra-cm3 --out)")
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
    p.add_argument(
        "--copy-weight",
        dest="copy_weights",
        type=float,
        nargs="+",
        default=list(d.copy_weights),
        help="copy interpolation weights: one ra-cm3 + copy w system each, 0 leaves it out "
        f"(default {' '.join(map(str, d.copy_weights))})",
    )
    p.add_argument(
        "--split",
        choices=("heldout", "validation"),
        default=d.split,
        help="score the held-out (test) variants or the validation ones (train ra-cm3 "
        "--validation), on which decoding settings are chosen (default heldout)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/eval-ra-cm3.json"), help="results JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prepare(args.threads)
    chosen = {name: getattr(args, name) for name in SETTING_FLAGS}
    settings = Settings(
        **chosen,
        copy_weights=tuple(args.copy_weights),
        split=args.split,
        progress=not args.no_progress,
    )
    result = evaluate(args.ra, args.vanilla, args.memory, settings, args.vq)
    report(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
