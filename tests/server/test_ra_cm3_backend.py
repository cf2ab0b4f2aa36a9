"""The generation endpoints with a real (tiny, random) RA-CM3 model wired in."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from conftest import build_tiny_racm3, png_bytes
from mmrag.encoders.base import EncoderSpec
from mmrag.server.app import create_app
from mmrag.server.ra_cm3_backend import ra_cm3_capabilities

TOKEN = "test-token-0123456789abcdef"


def save_model(folder: Path) -> Path:
    build_tiny_racm3().save_pretrained(folder)
    return folder


def test_generate_image_and_caption_with_evidence(tmp_path: Path) -> None:
    model_dir = save_model(tmp_path / "model")
    app = create_app(
        tmp_path / "memory",
        token=TOKEN,
        encoder=EncoderSpec(name="hashing"),
        capabilities=ra_cm3_capabilities(model_dir),
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        docs = [
            {"text": f"a {c} square", "image_base64": base64.b64encode(png_bytes(rgb)).decode()}
            for c, rgb in (
                ("red", (230, 20, 20)),
                ("blue", (20, 40, 230)),
                ("green", (20, 200, 40)),
            )
        ]
        r = client.post("/documents", json={"documents": docs}, headers=headers)
        assert r.status_code in (200, 201), r.text
        r = client.post("/generate/image", json={"prompt": "a red square", "k": 2, "seed": 1})
        assert r.status_code == 200, r.text
        out = r.json()
        image = Image.open(io.BytesIO(base64.b64decode(out["image"]["data_base64"])))
        assert image.size == (16, 16)
        assert len(out["evidence"]) == 2 and out["evidence"][0]["text"].startswith("a ")
        r = client.post("/generate/image", json={"prompt": "a red square", "k": 0})
        assert r.status_code == 200 and r.json()["evidence"] == []
        r = client.post(
            "/generate/caption",
            json={"image_base64": base64.b64encode(png_bytes((230, 20, 20))).decode(), "k": 1},
        )
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["caption"], str) and len(r.json()["evidence"]) == 1
