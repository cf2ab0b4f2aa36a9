"""The demo's RA-CM3 section: images drawn from captions and captions written for images, each
with and without retrieval, shown beside the evidence the model was conditioned on."""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

from PIL import Image

from mmrag.checkpoints import CheckpointNotFoundError
from mmrag.documents import load_image
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.model import RACM3, CaptionOutput, Evidence

log = logging.getLogger(__name__)

# Captions to draw: variants whose siblings are in the memory, and plain emoji names.
CAPTIONS = (
    "woman dancing: medium skin tone",
    "thumbs up: dark skin tone",
    "red apple",
    "grinning cat",
)
# Emoji (by their `emoji` metadata) whose images are captioned.
CAPTION_IMAGES = ("🧑🏽‍🚀", "🍕", "👍🏿")


def data_uri(image: Image.Image, size: int = 96) -> str:
    buf = io.BytesIO()
    image.convert("RGB").resize((size, size), Image.Resampling.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _evidence(items: list[Evidence]) -> list[dict[str, Any]]:
    rows = []
    for e in items:
        thumb = data_uri(load_image(e.image)) if e.image else ""
        rows.append({"id": e.id, "score": e.score, "text": f"evidence: {e.text}", "thumb": thumb})
    return rows


def _caption_row(label: str, out: CaptionOutput) -> dict[str, Any]:
    """A written caption with what chose it: the stored document it copies, the dual
    encoder's match (composed captions), or the perplexity of the generator's sample."""
    if out.copied is not None:
        how, score = f"copied from {out.copied[:12]}", 1.0
    elif out.ranked:
        how, score = "dual-encoder match", out.ranked[0][1]
    else:
        how, score = "perplexity", out.perplexity
    return {
        "id": "generated",
        "score": score,
        "thumb": "",
        "text": f"{label}: “{out.text}” ({how})",
    }


def generation_sections(memory: Memory, find: Any, progress: bool = True) -> list[dict[str, Any]]:
    """Rows for the report (same shape as the retrieval sections); [] without a model.

    `find(memory, key, value)` returns a stored document with that metadata (demo.py's)."""
    try:
        model = RACM3.from_pretrained(memory=memory)
    except CheckpointNotFoundError as e:
        log.warning("no RA-CM3 section: %s", e)
        return []
    drawn: list[dict[str, Any]] = []
    for caption in CAPTIONS:
        with_ret = model.generate_image(caption, seed=0)
        without = model.generate_image(caption, seed=0, retrieval=False)
        results = [
            {
                "id": "generated",
                "score": max(with_ret.scores),
                "thumb": data_uri(with_ret.image),
                "text": "RA-CM3 with retrieval (dual-encoder score)",
            },
            {
                "id": "generated",
                "score": max(without.scores),
                "thumb": data_uri(without.image),
                "text": "same model, no retrieval",
            },
            *_evidence(with_ret.evidence),
        ]
        drawn.append({"query": caption, "results": results})
    written: list[dict[str, Any]] = []
    for emoji in CAPTION_IMAGES:
        anchor = find(memory, "emoji", emoji)
        if anchor is None or anchor.image is None:
            continue
        image = load_image(anchor.image)
        cap_ret = model.generate_caption(image, seed=0)
        cap_none = model.generate_caption(image, seed=0, retrieval=False)
        results = [
            _caption_row("RA-CM3", cap_ret),
            _caption_row("no retrieval", cap_none),
            *_evidence(cap_ret.evidence),
        ]
        written.append(
            {
                "query": "",
                "query_image": data_uri(image, 48),
                "query_caption": anchor.text,
                "results": results,
            }
        )
    copied = model.config.copy_weight
    return [
        {
            "title": "RA-CM3: caption → image",
            "explanation": "The shipped RA-CM3 model (checkpoints/ra-cm3) draws each caption "
            "with the documents it retrieved from this memory prepended, and again without "
            "retrieval. With retrieval, a stored caption is drawn as its stored image; an "
            "unstored one copies the top retrieved image, changed as pairs of retrieved "
            "documents that differ the same way show: a colour analogy recolours it and is "
            "copied whole; otherwise each code is sampled from the generator mixed with the "
            f"copy's code at that cell (copy weight {copied:g}), and the best of the samples by "
            "the dual encoder is kept (docs/ra-cm3.md). The evidence follows.",
            "rows": drawn,
        },
        {
            "title": "RA-CM3: image → caption",
            "explanation": "With retrieval, an image the memory holds is captioned with its "
            "stored caption; another gets the best by the dual encoder of the retrieved "
            "captions, their recombinations and the generator's samples, a candidate whose "
            "drawing looks like the image first. Without retrieval, the generator's sample of "
            "lowest perplexity. (The query documents are in the memory, so retrieval can find "
            "them: this shows the mechanism; docs/ra-cm3.md measures held-out variants.)",
            "rows": written,
        },
    ]
