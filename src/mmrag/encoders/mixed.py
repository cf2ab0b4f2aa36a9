"""RA-CM3's mixed-modal encoding: normalise each modality, average, normalise (section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from mmrag.documents import Document
from mmrag.encoders.base import Encoder, Vectors, l2_normalize


def combine(modalities: Sequence[Vectors]) -> Vectors:
    """Average L2-normalised vectors (one per modality) and normalise the average."""
    if not modalities:
        raise ValueError("nothing to combine")
    stacked = np.stack([l2_normalize(v) for v in modalities])  # (M, D)
    return l2_normalize(stacked.mean(axis=0))


def encode_documents(
    encoder: Encoder, docs: Sequence[Document], images: Sequence[Sequence[Image.Image]]
) -> Vectors:
    """One vector per document. `images[i]` are the decoded image parts of `docs[i]`.

    The text tower sees a document's text parts joined; each image goes through the image
    tower; a document with several images uses their normalised mean as its image vector.
    """
    if len(docs) != len(images):
        raise ValueError("need one list of decoded images per document")
    texts = [d.text for d in docs]
    text_rows = [i for i, t in enumerate(texts) if t]
    flat_images = [img for imgs in images for img in imgs]
    text_vecs = encoder.encode_text([texts[i] for i in text_rows]) if text_rows else None
    image_vecs = encoder.encode_image(flat_images) if flat_images else None
    text_of = {row: j for j, row in enumerate(text_rows)}
    out = np.empty((len(docs), encoder.dim), dtype=np.float32)
    cursor = 0
    for i, imgs in enumerate(images):
        parts: list[Vectors] = []
        if i in text_of and text_vecs is not None:
            parts.append(text_vecs[text_of[i]])
        if imgs and image_vecs is not None:
            parts.append(l2_normalize(image_vecs[cursor : cursor + len(imgs)].mean(axis=0)))
            cursor += len(imgs)
        if not parts:
            raise ValueError(f"document {docs[i].id} has neither text nor images to encode")
        out[i] = combine(parts)
    return out


def encode_isolated(
    encoder: Encoder, docs: Sequence[Document], images: Sequence[Sequence[Image.Image]]
) -> tuple[Vectors, list[Exception | None]]:
    """`encode_documents`, where one document the encoder rejects fails alone: when the batch
    fails, each document is encoded by itself; returns the vectors (a failed document's row
    is zero) and each document's error (None where it was encoded). When every document of
    the batch fails alone too, the cause is no document's: the first error is raised."""
    try:
        return encode_documents(encoder, docs, images), [None] * len(docs)
    except Exception:  # find the culprit(s) below
        pass
    out = np.zeros((len(docs), encoder.dim), np.float32)
    errors: list[Exception | None] = []
    for i, (doc, imgs) in enumerate(zip(docs, images, strict=True)):
        try:
            out[i] = encode_documents(encoder, [doc], [imgs])[0]
            errors.append(None)
        except Exception as e:
            errors.append(e)
    if errors and all(e is not None for e in errors):
        raise errors[0]  # type: ignore[misc]
    return out, errors


def encode_query(
    encoder: Encoder, text: str | None = None, images: Sequence[Image.Image] = ()
) -> Vectors:
    """A query is encoded exactly like a document: text only, image(s) only, or both."""
    return query_vector(
        encoder.encode_text([text]) if text else None,
        encoder.encode_image(list(images)) if images else None,
    )


def query_vector(text_rows: Vectors | None, image_rows: Vectors | None) -> Vectors:
    """The query's vector from its text's row (1, D) and its images' rows (N, D), either
    absent: what `encode_query` computes, for callers that encoded the parts themselves."""
    parts: list[Vectors] = []
    if text_rows is not None:
        parts.append(text_rows[0])
    if image_rows is not None and len(image_rows):
        parts.append(l2_normalize(image_rows.mean(axis=0)))
    if not parts:
        raise ValueError("a query needs text, an image, or both")
    return combine(parts)
