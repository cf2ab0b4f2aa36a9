"""Library objects as API models: results, documents, images and stats, with no file paths."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

from mmrag.memory.memory import StoredDocument
from mmrag.retrieval import SearchResult
from mmrag.server.config import ServerConfig
from mmrag.server.schemas import (
    DocumentOut,
    EncoderInfo,
    Hit,
    ImageRef,
    IndexInfo,
    Limits,
    PartOut,
    PngImage,
    ServerInfo,
    StatsResponse,
)

THUMBNAIL_SIZE = 256  # what the page shows in its results grid


def image_ref(sha256: str) -> ImageRef:
    url = f"/images/{sha256}"
    return ImageRef(sha256=sha256, url=url, thumbnail_url=f"{url}?size={THUMBNAIL_SIZE}")


def hit(result: SearchResult) -> Hit:
    return Hit(
        id=result.id,
        score=round(result.score, 6),
        text=result.text,
        modality=result.modality,
        images=[image_ref(p.sha256) for p in result.parts if p.kind == "image" and p.sha256],
        metadata=result.metadata,
    )


def hits(results: Sequence[SearchResult]) -> list[Hit]:
    return [hit(r) for r in results]


def document(doc: StoredDocument) -> DocumentOut:
    parts = [
        PartOut(text=p.text) if p.kind == "text" else PartOut(image=image_ref(p.sha256 or ""))
        for p in doc.parts
    ]
    return DocumentOut(id=doc.id, modality=doc.modality, parts=parts, metadata=doc.metadata)


def png(image: Image.Image) -> PngImage:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return PngImage(
        width=image.width,
        height=image.height,
        data_base64=base64.b64encode(buf.getvalue()).decode("ascii"),
    )


def stats(
    raw: dict[str, Any], config: ServerConfig, writable: bool, capabilities: dict[str, bool]
) -> StatsResponse:
    """The memory's stats without its folder or the encoder's checkpoint path."""
    limits = Limits(
        max_upload_bytes=config.max_upload_bytes,
        max_request_bytes=config.max_request_bytes,
        max_pixels=config.max_pixels,
        max_k=config.max_k,
        max_batch_documents=config.max_batch_documents,
        max_text_chars=config.max_text_chars,
    )
    encoder, index = raw["encoder"], raw["index"]
    return StatsResponse(
        count=raw["count"],
        by_modality=raw["by_modality"],
        images=raw["images"],
        deleted_total=raw["deleted_total"],
        generation=raw["generation"],
        encoder=EncoderInfo(
            name=encoder["name"], fingerprint=encoder["fingerprint"], dim=encoder["dim"]
        ),
        index=IndexInfo(
            kind=index["kind"], vectors=index["vectors"], generation=index["generation"]
        ),
        blob_bytes=raw["blob_bytes"],
        database_bytes=raw["database_bytes"],
        server=ServerInfo(
            writable=writable,
            open_reads=config.open_reads,
            limits=limits,
            capabilities=capabilities,
        ),
    )
