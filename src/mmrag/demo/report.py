"""`mmrag demo`: build the emoji + photos memory (cached) and report retrieval in HTML."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmrag.data.datasets import build_dataset
from mmrag.data.readers import read_sources
from mmrag.data.writer import DatasetError
from mmrag.demo.chat import chat_sections
from mmrag.demo.generation import generation_sections
from mmrag.documents import Document, DocumentError
from mmrag.encoders.base import EncoderSpec
from mmrag.encoders.lite import shared_image_features
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.retrieval import Retriever, SearchResult

log = logging.getLogger(__name__)

K = 5
THUMB = 96
TEXT_QUERIES = (
    "a cat",
    "a cup of hot coffee",
    "a rocket launching into space",
    "woman dancing",
    "a slice of pizza",
    "flag of Japan",
    "a red heart",
    "the moon at night",
)
# (emoji whose image is the query, the reason it is interesting)
IMAGE_QUERIES = (("💃🏽", "dancer"), ("🚀", "rocket"), ("🍕", "pizza"))
PHOTO_QUERIES = ("chelsea", "coffee", "astronaut")  # photos: what emoji look like them?
# (emoji image, text): the text steers the image query (RA-CM3's mixed-modal queries)
MIXED_QUERIES = (
    ("💃", "dark skin tone"),
    ("👍", "medium-light skin tone"),
    ("❤️", "blue heart"),
    ("🧑‍🚀", "woman astronaut"),
)


# Real photographs (scikit-image, scikit-learn, GCompris) and drawings (GCompris, Openclipart),
# searched by text in a memory of their own (the emoji memory feeds the generators, which
# know emoji only).
REAL_QUERIES = (
    "a cat",
    "a cup of coffee",
    "a red motorcycle",
    "an astronaut",
    "a flower",
    "a bird",
    "a car",
    "a guitar",
    "an apple",
    "a house",
    "a hammer",
    "a giraffe",
)


@dataclass
class Section:
    title: str
    explanation: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def _thumbnail(path: str | None) -> str:
    if path is None:
        return ""
    with Image.open(path) as src:
        img = src.convert("RGB")
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _results(results: list[SearchResult]) -> list[dict[str, Any]]:
    return [{**r.to_json(), "thumb": _thumbnail(r.image)} for r in results]


def _find(memory: Memory, key: str, value: str) -> SearchResult | None:
    seqs = memory.store.seqs_matching({key: value})
    if not len(seqs):
        log.warning("demo: no document with %s=%r (skipped)", key, value)
        return None
    doc = memory.get_by_seq([int(seqs[0])])[0]
    return SearchResult.of(doc, 1.0) if doc else None


def build_memory(
    out: Path, limit: int | None, progress: bool, rebuild: bool, spec: EncoderSpec
) -> tuple[Path, dict[str, Any]]:
    """The demo memory at OUT/memory from the emoji and photos data sets (cached)."""
    data = out / "data"
    sources = []
    for name in ("emoji", "photos"):
        folder = data / name
        if rebuild or not (folder / "documents.jsonl").exists():
            build_dataset(name, folder, limit=limit if name == "emoji" else None, progress=progress)
        sources.append(folder)
    memory_dir = out / "memory"
    if rebuild and memory_dir.exists():
        shutil.rmtree(memory_dir)
    start = time.perf_counter()
    with ensure_memory(memory_dir, spec) as memory:
        report = ingest(memory, read_sources(sources), progress=progress)
        info = {
            "ingest": report.to_dict(),
            "stats": memory.stats(),
            "build_seconds": round(time.perf_counter() - start, 2),
        }
    return memory_dir, info


def build_real_memory(
    out: Path, limit: int | None, progress: bool, rebuild: bool, spec: EncoderSpec
) -> Path:
    """OUT/memory-real: the photos and (when Debian's gcompris-qt-data and openclipart-png
    are installed) GCompris's photographs and drawings and the Openclipart drawings (the
    first `limit` of each, like the emoji)."""
    sources = [out / "data" / "photos"]
    for name, what in (("gcompris", "GCompris pictures"), ("openclipart", "Openclipart drawings")):
        folder = out / "data" / name
        if rebuild or not (folder / "documents.jsonl").exists():
            try:
                build_dataset(name, folder, limit=limit, progress=progress)
            except DatasetError as e:
                log.warning("demo: no %s in the real-image section (%s)", what, e)
        if (folder / "documents.jsonl").exists():
            sources.append(folder)
    memory_dir = out / "memory-real"
    if rebuild and memory_dir.exists():
        shutil.rmtree(memory_dir)
    with ensure_memory(memory_dir, spec) as memory:
        ingest(memory, images_only(read_sources(sources)), progress=progress)
    return memory_dir


def images_only(items: Iterable[Document | DocumentError]) -> Iterator[Document | DocumentError]:
    """Each document as its image alone, the caption kept in the metadata (`caption`) for
    display: the search then finds pictures by what they show, not by their captions."""
    for item in items:
        if isinstance(item, DocumentError) or not item.images:
            yield item
            continue
        yield Document(parts=(item.images[0],), metadata={**item.metadata, "caption": item.text})


def real_image_section(memory: Memory) -> Section:
    retriever = Retriever(memory)
    section = Section(
        "Real photographs and drawings: text → image",
        f"A memory of {len(memory)} real photographs (scikit-image, scikit-learn, GCompris) "
        "and drawings (GCompris, Openclipart), ingested as images alone with the default "
        "encoder and searched by text: what is found is found by the picture. Under each "
        "result, the caption it was not indexed with (from file names: Openclipart's are "
        "noisy). The shipped encoder was trained on these pictures; docs/encoders.md scores "
        "unseen ones.",
    )
    for q in REAL_QUERIES:
        results = _results(retriever.search(text=q, k=K))
        for r in results:
            r["text"] = r["text"] or str(r["metadata"].get("caption", ""))
        section.rows.append({"query": q, "results": results})
    return section


def run_queries(memory: Memory) -> list[Section]:
    retriever = Retriever(memory)
    text = Section("Text → image", "A caption finds documents by their images and captions.")
    for q in TEXT_QUERIES:
        text.rows.append({"query": q, "results": _results(retriever.search(text=q, k=K))})
    image = Section(
        "Image → text",
        "An image alone is the query (the document itself excluded); "
        "photographs find the emoji that look like them.",
    )
    for value, _ in IMAGE_QUERIES:
        _image_row(image, retriever, _find(memory, "emoji", value))
    for value in PHOTO_QUERIES:
        _image_row(image, retriever, _find(memory, "name", value))
    mixed = Section(
        "Image + text → document",
        "RA-CM3's mixed-modal query: the normalised average of the image and the text embeddings.",
    )
    for value, words in MIXED_QUERIES:
        anchor = _find(memory, "emoji", value)
        if anchor is None or anchor.image is None:
            continue
        results = retriever.search(text=words, image=anchor.image, k=K)
        mixed.rows.append(
            {
                "query": words,
                "query_image": _thumbnail(anchor.image),
                "query_caption": anchor.text,
                "results": _results(results),
            }
        )
    return [text, image, mixed]


def _image_row(section: Section, retriever: Retriever, anchor: SearchResult | None) -> None:
    if anchor is None or anchor.image is None:
        return
    results = retriever.search(image=anchor.image, k=K, exclude_ids=[anchor.id])
    section.rows.append(
        {
            "query": "",
            "query_image": _thumbnail(anchor.image),
            "query_caption": anchor.text,
            "results": _results(results),
        }
    )


def render_html(sections: list[Section], info: dict[str, Any]) -> str:
    stats = info["stats"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>mmrag demo</title><style>body{font-family:system-ui,sans-serif;margin:2rem;"
        "max-width:70rem}figure{display:inline-block;width:8.5rem;margin:.3rem;"
        "vertical-align:top;font-size:.8rem}figure img{width:96px;height:96px;"
        "object-fit:contain;border:1px solid #ccc;background:#fff}.q{margin:1rem 0 .2rem;"
        "font-weight:600}.score{color:#555}code{font-size:.75rem}</style></head><body>",
        "<h1>mmrag: retrieval over a multimodal memory</h1>",
        f"<p>{stats['count']} documents, encoder <code>{html.escape(stats['encoder']['name'])}"
        f"</code> (fingerprint <code>{html.escape(stats['encoder']['fingerprint'][:16])}</code>),"
        f" {html.escape(stats['index']['kind'])} index. Built or loaded in "
        f"{info['build_seconds']} s. Scores are inner products of L2-normalised vectors.</p>",
    ]
    for section in sections:
        parts.append(
            f"<h2>{html.escape(section.title)}</h2><p>{html.escape(section.explanation)}</p>"
        )
        for row in section.rows:
            label = html.escape(row["query"])
            if row.get("query_image"):
                caption = html.escape(row["query_caption"])
                label = (
                    f"<img src='{row['query_image']}' alt='{caption}' width='48' height='48'>"
                    f" {caption}" + (f" + “{label}”" if label else "")
                )
            parts.append(f"<div class='q'>Query: {label}</div>")
            for r in row["results"]:
                caption = html.escape(r["text"])
                img = f"<img src='{r['thumb']}' alt='{caption}'>" if r["thumb"] else ""
                parts.append(
                    f"<figure>{img}<figcaption>{caption}<br><span class='score'>"
                    f"score {r['score']:.3f}</span><br><code>{r['id'][:12]}</code>"
                    "</figcaption></figure>"
                )
    parts.append("</body></html>")
    return "\n".join(parts)


def run_demo(
    out: Path,
    limit: int | None = None,
    progress: bool = True,
    rebuild: bool = False,
    spec: EncoderSpec | None = None,
    generation: bool = True,
    chat: bool = False,
) -> Path:
    """Build (or reuse) the demo memory, run the queries, write OUT/report.html. With
    `generation`, RA-CM3 draws and captions too; with `chat`, a scripted conversation runs
    with FROMAGe / GILL (each when its checkpoint is present)."""
    out.mkdir(parents=True, exist_ok=True)
    with shared_image_features():
        memory_dir, info = build_memory(out, limit, progress, rebuild, spec or EncoderSpec())
        with Memory.open(memory_dir) as memory:
            sections = run_queries(memory)
            if generation:
                sections += [Section(**s) for s in generation_sections(memory, _find, progress)]
            if chat:
                sections += [Section(**s) for s in chat_sections(memory, _find)]
        real = build_real_memory(out, limit, progress, rebuild, spec or EncoderSpec())
        with Memory.open(real) as memory:
            sections.insert(3, real_image_section(memory))
    report = out / "report.html"
    report.write_text(render_html(sections, info), encoding="utf-8")
    results = {
        "info": info,
        "sections": [
            {
                "title": s.title,
                "rows": [
                    {
                        **{k: v for k, v in row.items() if k not in ("query_image",)},
                        "results": [
                            {k: v for k, v in r.items() if k != "thumb"} for r in row["results"]
                        ],
                    }
                    for row in s.rows
                ],
            }
            for s in sections
        ],
    }
    (out / "results.json").write_text(
        json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    return report
