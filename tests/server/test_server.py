"""The HTTP service: every endpoint, every 4xx path, access rules, wiring, and concurrency."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import COLORS, HASHING, png_bytes, serve_in_thread
from mmrag.config import ConfigError
from mmrag.documents import Document
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.retrieval import Retriever, SearchResult
from mmrag.server import Capabilities, ServerConfig, create_app
from mmrag.server.auth import TOKEN_ENV, TokenError, load_token
from mmrag.server.capabilities import (
    Caption,
    ChatReply,
    ChatTurn,
    GenerationOptions,
    ImageGeneration,
)

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POEM = "a poem about the quiet sea at night"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def color_doc(name: str) -> dict[str, Any]:
    return {
        "text": f"a {name} square",
        "image_base64": b64(png_bytes(COLORS[name])),
        "metadata": {"color": name},
    }


def seed(client: TestClient) -> dict[str, str]:
    """Six colour documents and one text-only poem; returns {name: id}."""
    docs = [color_doc(name) for name in COLORS] + [{"text": POEM, "metadata": {"kind": "poem"}}]
    r = client.post("/documents", json={"documents": docs}, headers=AUTH)
    assert r.status_code == 200, r.text
    ids = [d["id"] for d in r.json()["documents"]]
    return dict(zip([*COLORS, "poem"], ids, strict=True))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, structurally valid PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def client(memory_path: Path) -> Iterator[TestClient]:
    app = create_app(memory_path, token=TOKEN, encoder=HASHING)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def seeded(client: TestClient) -> dict[str, str]:
    return seed(client)


def make_client(path: Path, **kwargs: Any) -> TestClient:
    kwargs.setdefault("encoder", HASHING)
    return TestClient(create_app(path, **kwargs))


# --- service ------------------------------------------------------------------------------


def test_health_page_and_schema(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "version": "0.1.0"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text and "http" not in page.text.split("<body")[0]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/docs").status_code == 404  # Swagger UI would load assets from a CDN
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/health", "/stats", "/search", "/documents", "/documents/{doc_id}",
        "/images/{sha256}", "/generate/image", "/generate/caption", "/chat",
    }  # fmt: skip
    components = schema["components"]["schemas"]
    for model in ("SearchRequest", "DocumentsRequest", "ImageGenerationRequest", "ChatRequest"):
        assert model in components
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {
        "application/json",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    }
    for path in ("/generate/image", "/generate/caption", "/chat"):
        assert "501" in schema["paths"][path]["post"]["responses"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_worker_threads_cap_openmp(client: TestClient) -> None:
    import faiss

    pool = client.app.state.mmrag.pool  # type: ignore[attr-defined]
    assert pool.submit(faiss.omp_get_max_threads).result() == 1  # the server's default
    with pytest.raises(ConfigError, match="openmp_threads"):
        ServerConfig(openmp_threads=0)


def test_stats_hide_paths(client: TestClient, seeded: dict[str, str], memory_path: Path) -> None:
    r = client.get("/stats")
    stats = r.json()
    assert stats["count"] == 7 and stats["images"] == 6
    assert stats["by_modality"] == {"mixed": 6, "text": 1}
    assert stats["encoder"]["name"] == "hashing" and stats["index"]["vectors"] == 7
    assert stats["server"]["writable"] is True
    assert stats["server"]["capabilities"] == {
        "image_generation": False,
        "captioning": False,
        "chat": False,
    }
    assert str(memory_path) not in r.text and "/blobs" not in r.text


# --- documents ------------------------------------------------------------------------------


def test_add_documents_json_ids_and_existing(client: TestClient) -> None:
    ids = seed(client)
    expected = Document.of(text="a red square", image=png_bytes(COLORS["red"]))
    assert ids["red"] == expected.id  # the library's content-hash id
    again = client.post(
        "/documents", json={"documents": [color_doc("red"), color_doc("red")]}, headers=AUTH
    ).json()
    assert again["added"] == 0 and again["existing"] == 2 and again["count"] == 7
    parts = {
        "parts": [
            {"text": "before"},
            {"image_base64": b64(png_bytes((1, 2, 3)))},
            {"text": "after"},
        ]
    }
    r = client.post("/documents", json={"documents": [parts, parts]}, headers=AUTH).json()
    assert [d["status"] for d in r["documents"]] == ["added", "existing"] and r["count"] == 8
    doc = client.get(f"/documents/{r['documents'][0]['id']}").json()
    assert [p["text"] for p in doc["parts"]] == ["before", None, "after"]
    assert doc["parts"][1]["image"]["url"].startswith("/images/") and doc["modality"] == "mixed"


def test_add_documents_multipart(client: TestClient) -> None:
    files = [("image", (f"{n}.png", png_bytes(COLORS[n]), "image/png")) for n in ("red", "blue")]
    data = {"text": ["a red square", "a blue square"], "metadata": json.dumps({"set": "upload"})}
    r = client.post("/documents", files=files, data=data, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 2
    red = client.get(f"/documents/{r.json()['documents'][0]['id']}").json()
    assert red["parts"][1]["text"] == "a red square" and red["metadata"] == {"set": "upload"}
    texts = client.post("/documents", data={"text": ["one", "two", "three"]}, headers=AUTH)
    assert texts.json()["added"] == 3 and texts.json()["count"] == 5
    mismatch = client.post("/documents", files=files, data={"text": ["only one"]}, headers=AUTH)
    assert mismatch.status_code == 422 and "one per image" in mismatch.json()["detail"]


def test_delete(client: TestClient, seeded: dict[str, str]) -> None:
    red = seeded["red"]
    sha = client.get(f"/documents/{red}").json()["parts"][0]["image"]["sha256"]
    assert client.delete(f"/documents/{red}").status_code == 401
    assert (
        client.delete(f"/documents/{red}", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    r = client.delete(f"/documents/{red}", headers=AUTH)
    assert r.json() == {"id": red, "deleted": True, "count": 6}
    assert client.delete(f"/documents/{red}", headers=AUTH).status_code == 404
    assert client.get(f"/documents/{red}").status_code == 404
    assert client.get(f"/images/{sha}").status_code == 404
    hits = client.post("/search", json={"text": "a red square", "k": 100}).json()["results"]
    assert red not in {h["id"] for h in hits} and len(hits) == 6


# --- search and images ------------------------------------------------------------------------


def test_search_text_image_mixed(
    client: TestClient, seeded: dict[str, str], memory_path: Path
) -> None:
    r = client.post("/search", json={"text": "poem about the quiet sea", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 7 and len(body["results"]) == 3
    assert body["results"][0]["id"] == seeded["poem"] and body["results"][0]["images"] == []
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    blue = png_bytes(COLORS["blue"])
    by_json = client.post("/search", json={"image_base64": b64(blue), "k": 2}).json()
    by_form = client.post("/search", files={"image": ("q.png", blue, "image/png")}, data={"k": "2"})
    assert by_form.status_code == 200
    assert by_json["results"] == by_form.json()["results"]
    assert by_json["results"][0]["id"] == seeded["blue"]
    mixed = client.post(
        "/search", files={"image": ("q.png", blue, "image/png")}, data={"text": "a blue square"}
    ).json()
    assert mixed["results"][0]["id"] == seeded["blue"]
    assert str(memory_path) not in json.dumps(mixed) and "/blobs/" not in json.dumps(mixed)


def test_search_filters_and_options(client: TestClient, seeded: dict[str, str]) -> None:
    def ids(**body: Any) -> list[str]:
        r = client.post("/search", json={"text": "a square", "k": 10, **body})
        assert r.status_code == 200, r.text
        return [h["id"] for h in r.json()["results"]]

    assert ids(filters={"color": "red"}) == [seeded["red"]]
    assert set(ids(filters={"color": ["red", "blue"]})) == {seeded["red"], seeded["blue"]}
    assert ids(filters={"modality": "text"}) == [seeded["poem"]]
    assert ids(filters={"color": "purple"}) == []
    assert seeded["red"] not in ids(exclude_ids=[seeded["red"]])
    assert len(ids(mmr_lambda=0.5)) == 7
    form = client.post(
        "/search",
        data={"text": "a square", "filters": json.dumps({"color": "green"}), "k": "5"},
        files={"unused": ("x.txt", b"", "text/plain")},
    )
    assert form.status_code == 422  # an unknown file field
    form = client.post(
        "/search", data={"text": "a square", "filters": json.dumps({"color": "green"})},
        files=[],
    )  # fmt: skip
    assert form.status_code == 200, form.text
    assert [h["id"] for h in form.json()["results"]] == [seeded["green"]]


def test_images_by_sha(client: TestClient, seeded: dict[str, str]) -> None:
    doc = client.get(f"/documents/{seeded['yellow']}").json()
    ref = doc["parts"][0]["image"]
    r = client.get(ref["url"])
    assert r.status_code == 200 and r.content == png_bytes(COLORS["yellow"])
    assert r.headers["content-type"] == "image/png" and "immutable" in r.headers["cache-control"]
    thumb = client.get(f"{ref['url']}?size=16")
    assert thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (16, 16)
    assert client.get(ref["thumbnail_url"]).status_code == 200
    assert client.get("/images/" + "0" * 64).status_code == 404
    assert client.get("/images/../../manifest.json").status_code == 404
    assert client.get("/images/" + "Z" * 64).status_code == 422
    assert client.get(f"{ref['url']}?size=5000").status_code == 422
    assert client.get("/documents/" + "f" * 32).status_code == 404
    assert client.get("/documents/not-an-id").status_code == 422


# --- bad input ------------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert isinstance(body["detail"], str)
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def test_bad_search_input(client: TestClient, seeded: dict[str, str]) -> None:
    post = client.post
    bad_json = post("/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert assert_error(bad_json, 422)["errors"][0]["type"] == "json_invalid"
    assert_error(post("/search", json={"text": "x", "k": "many"}), 422, "body.k")
    assert_error(post("/search", json={"text": "x", "k": 0}), 422, "body.k")
    assert_error(post("/search", json={"text": "x", "k": 101}), 422, "body.k")
    assert_error(post("/search", json={"text": "x", "filters": {"bad key!": 1}}), 422, "filters")
    assert_error(post("/search", json={"text": "x", "filters": {"a": {"b": 1}}}), 422, "filters")
    assert_error(post("/search", json={"text": "x", "filters": {"a": []}}), 422, "filters")
    assert_error(post("/search", json={"text": "x", "colour": "red"}), 422, "colour")
    assert_error(post("/search", json={"text": "   "}), 422, "body.text", "blank")
    assert_error(post("/search", json={}), 422, "a text, an image, or both")
    assert_error(post("/search", json={"text": "x", "exclude_ids": ["nope"]}), 422, "exclude_ids")
    assert_error(post("/search", json={"image_base64": "***"}), 422, "base64")
    assert_error(post("/search", json=[1, 2]), 422)
    assert_error(post("/search", content=b"text=x", headers={"Content-Type": "text/plain"}), 415)
    assert_error(post("/search", data={"text": "x", "filters": "{oops"}), 422, "JSON")
    text_file = {"image": ("notes.txt", b"just some words", "text/plain")}
    assert_error(post("/search", files=text_file), 422, "unreadable image")
    two = [("image", ("a.png", png_bytes((1, 1, 1)), "image/png"))] * 2
    assert_error(post("/search", files=two), 400, "Too many files")
    assert_error(client.put("/search", json={"text": "x"}), 405)


def test_decompression_bomb_and_pixel_limit(memory_path: Path) -> None:
    config = ServerConfig(max_pixels=10_000)
    with make_client(memory_path, token=TOKEN, config=config) as client:
        bomb = png_header_only(50_000, 50_000)
        assert len(bomb) < 200
        r = client.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
        assert_error(r, 422, "body.image", "DecompressionBomb")
        big = png_header_only(8_000, 8_000)  # under PIL's own limit, over ours
        assert_error(client.post("/search", json={"image_base64": b64(big)}), 422, "pixel limit")
        doc = {"text": "big", "image_base64": b64(big)}
        r = client.post("/documents", json={"documents": [doc]}, headers=AUTH)
        assert_error(r, 422, "body.documents.0", "pixel limit")
        assert client.get("/stats").json()["count"] == 0  # nothing written


def test_size_limits(memory_path: Path) -> None:
    config = ServerConfig(max_upload_bytes=2_000, max_request_bytes=4_000, max_batch_documents=3)
    noisy = Image.frombytes("RGB", (40, 40), os.urandom(40 * 40 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    large = buf.getvalue()
    assert len(large) > 2_000
    with make_client(memory_path, token=TOKEN, config=config) as client:
        r = client.post("/search", files={"image": ("big.png", large, "image/png")})
        assert_error(r, 413, "limit")
        assert_error(client.post("/search", json={"image_base64": b64(large)}), 413, "limit")
        docs = {"documents": [{"text": "x" * 5_000}]}
        assert_error(client.post("/documents", json=docs, headers=AUTH), 413, "4000-byte")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"documents": [{"text": "'
            for _ in range(10):
                yield b"y" * 1_000
            yield b'"}]}'

        r = client.post(
            "/documents", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert_error(r, 413, "limit")
        four = {"documents": [{"text": f"doc {i}"} for i in range(4)]}
        assert_error(client.post("/documents", json=four, headers=AUTH), 413, "at most 3")
        assert client.get("/stats").json()["count"] == 0


def test_bad_documents(client: TestClient) -> None:
    def add(*docs: Any) -> httpx.Response:
        return client.post("/documents", json={"documents": list(docs)}, headers=AUTH)

    assert_error(add({"text": "   "}), 422, "body.documents.0.text", "blank")
    assert_error(add({}), 422, "needs 'parts'")
    assert_error(add({"parts": [{"text": "a", "image_base64": b64(b"x")}]}), 422, "exactly one")
    assert_error(add({"parts": [{"text": "a"}], "text": "b"}), 422, "either 'parts'")
    assert_error(add({"text": "ok"}, {"image_base64": b64(b"not an image")}), 422, "documents.1")
    assert_error(add({"text": "ok", "metadata": "red"}), 422, "metadata")
    assert_error(client.post("/documents", json={"documents": []}, headers=AUTH), 422)
    assert client.get("/stats").json()["count"] == 0  # a bad batch writes nothing


# --- access -----------------------------------------------------------------------------------


def test_writes_need_the_token(client: TestClient) -> None:
    docs = {"documents": [{"text": "hello"}]}
    r = client.post("/documents", json=docs)
    assert_error(r, 401, "Bearer")
    assert r.headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
    assert_error(client.post("/documents", json=docs, headers=wrong), 401, "not the server's")
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert_error(client.post("/documents", json=docs, headers=basic), 401)
    assert client.post("/documents", json=docs, headers=AUTH).status_code == 200


def test_read_only_server_sees_other_writers(memory_path: Path) -> None:
    writer = ensure_memory(memory_path, HASHING)
    try:
        with make_client(memory_path, encoder=None) as client:  # no token: read-only
            stats = client.get("/stats").json()
            assert stats["server"]["writable"] is False and stats["count"] == 0
            r = client.post("/documents", json={"documents": [{"text": "x"}]}, headers=AUTH)
            assert_error(r, 403, "read-only")
            assert_error(client.delete("/documents/" + "a" * 32, headers=AUTH), 403)
            from mmrag.memory.ingest import ingest

            ingest(writer, [Document.of(text=POEM)], progress=False)
            hits = client.post("/search", json={"text": POEM}).json()
            assert hits["count"] == 1 and hits["results"][0]["text"] == POEM
    finally:
        writer.close()


def test_closed_reads(memory_path: Path) -> None:
    config = ServerConfig(open_reads=False)
    with make_client(memory_path, token=TOKEN, config=config) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        assert_error(client.get("/stats"), 401)
        assert_error(client.post("/search", json={"text": "x"}), 401)
        assert_error(client.get("/images/" + "0" * 64), 401)
        assert_error(client.post("/generate/image", json={"prompt": "x"}), 401)
        assert client.get("/stats", headers=AUTH).status_code == 200
        assert client.post("/search", json={"text": "x"}, headers=AUTH).status_code == 200
    with pytest.raises(TokenError, match="closed reads need a token"):
        create_app(memory_path, config=config)


def test_load_token(tmp_path: Path) -> None:
    assert load_token(None, {}) is None
    assert load_token(None, {TOKEN_ENV: f"  {TOKEN}\n"}) == TOKEN
    path = tmp_path / "token"
    path.write_text("file-token-0123456789\n")
    path.chmod(0o600)
    assert load_token(path, {TOKEN_ENV: TOKEN}) == "file-token-0123456789"  # the file wins
    with pytest.raises(TokenError, match="at least 16"):
        load_token(None, {TOKEN_ENV: "short"})
    with pytest.raises(TokenError, match="cannot read"):
        load_token(tmp_path / "missing", {})


# --- generation -------------------------------------------------------------------------------


def test_generation_answers_501_until_wired(client: TestClient) -> None:
    r = client.post("/generate/image", json={"prompt": "a red square"})
    assert_error(r, 501, "RA-CM3", "--generator")
    r = client.post("/generate/caption", json={"image_base64": b64(png_bytes((1, 2, 3)))})
    assert_error(r, 501, "RA-CM3")
    r = client.post(
        "/generate/caption", files={"image": ("a.png", png_bytes((1, 2, 3)), "image/png")}
    )
    assert_error(r, 501, "captioning")
    chat = {"messages": [{"role": "user", "parts": [{"text": "hi"}]}]}
    assert_error(client.post("/chat", json=chat), 501, "FROMAGe / GILL")
    assert_error(client.post("/generate/image", json={"prompt": ""}), 422, "prompt")
    assert_error(client.post("/chat", json={"messages": []}), 422, "messages")
    assert_error(client.post("/chat", json={"messages": [{"role": "bot", "parts": []}]}), 422)


class FakeModels:
    """Stands in for RA-CM3 and FROMAGe: retrieves with the server's retriever, answers
    deterministically, and records what it was given."""

    def __init__(self, memory: Memory, retriever: Any) -> None:
        self.retriever = retriever
        self.calls: list[tuple[str, Any]] = []

    def _evidence(self, text: str, options: GenerationOptions) -> list[SearchResult]:
        return self.retriever.search(text=text, k=options.k, filters=options.filters)  # type: ignore[no-any-return]

    def generate_image(self, prompt: str, options: GenerationOptions) -> ImageGeneration:
        self.calls.append(("image", (prompt, options)))
        return ImageGeneration(
            Image.new("RGB", (8, 4), (255, 0, 0)), self._evidence(prompt, options)
        )

    def caption(self, image: Image.Image, options: GenerationOptions) -> Caption:
        self.calls.append(("caption", (image.size, options)))
        return Caption("a square", self._evidence("a square", options))

    def chat(self, turns: Sequence[ChatTurn], options: GenerationOptions) -> ChatReply:
        self.calls.append(("chat", turns))
        evidence = self._evidence("a blue square", options)
        parts = ["Here is one:", evidence[0], "and a new one:", Image.new("RGB", (2, 2))]
        return ChatReply(parts, evidence)


def test_wired_capabilities(memory_path: Path) -> None:
    models: list[FakeModels] = []

    def wire(memory: Memory, retriever: Any) -> Capabilities:
        models.append(FakeModels(memory, retriever))
        return Capabilities(image_generator=models[0], captioner=models[0], chat=models[0])

    with make_client(memory_path, token=TOKEN, capabilities=wire) as client:
        ids = seed(client)
        assert all(client.get("/stats").json()["server"]["capabilities"].values())
        r = client.post("/generate/image", json={"prompt": "a red square", "k": 2, "seed": 7})
        assert r.status_code == 200, r.text
        out = r.json()
        image = Image.open(io.BytesIO(base64.b64decode(out["image"]["data_base64"])))
        assert image.format == "PNG" and image.size == (8, 4) == (out["image"]["width"], 4)
        assert len(out["evidence"]) == 2 and out["evidence"][0]["images"]
        kind, (prompt, options) = models[0].calls[-1]
        assert (kind, prompt, options.k, options.seed) == ("image", "a red square", 2, 7)
        r = client.post(
            "/generate/caption",
            files={"image": ("q.png", png_bytes(COLORS["red"], size=20), "image/png")},
            data={"k": "1", "filters": json.dumps({"color": "red"})},
        )
        assert r.json()["caption"] == "a square"
        assert [e["id"] for e in r.json()["evidence"]] == [ids["red"]]
        assert models[0].calls[-1][1][0] == (20, 20)
        pixel = b64(png_bytes(COLORS["blue"]))
        chat = {
            "messages": [
                {"role": "user", "parts": [{"text": "show me blue"}, {"image_base64": pixel}]},
            ],
            "k": 3,
        }
        reply = client.post("/chat", json=chat).json()
        parts = reply["message"]["parts"]
        assert [p["type"] for p in parts] == ["text", "image", "text", "image"]
        assert parts[1]["document_id"] == reply["evidence"][0]["id"]
        assert parts[1]["image"]["url"].startswith("/images/") and parts[3]["generated"]
        turns = models[0].calls[-1][1]
        assert turns[0].parts[0] == "show me blue" and isinstance(turns[0].parts[1], Image.Image)
        last_not_user = {"messages": [{"role": "assistant", "parts": [{"text": "hi"}]}]}
        assert_error(client.post("/chat", json=last_not_user), 422, "the user's")


# --- concurrency ------------------------------------------------------------------------------


def test_concurrent_writes_and_reads_keep_exact_counts(memory_path: Path) -> None:
    writers, batches, per_batch, readers = 6, 6, 4, 6
    errors: list[str] = []
    added: list[str] = []
    deleted: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    with make_client(memory_path, token=TOKEN) as client:

        def write(w: int) -> None:
            for b in range(batches):
                docs = [
                    {
                        "text": f"writer {w} batch {b} doc {i}",
                        "image_base64": b64(png_bytes((w * 40, b * 40, i * 60), pattern=i + 1)),
                        "metadata": {"writer": w},
                    }
                    for i in range(per_batch)
                ]
                r = client.post("/documents", json={"documents": docs}, headers=AUTH)
                if r.status_code != 200 or r.json()["added"] != per_batch:
                    errors.append(f"add: {r.status_code} {r.text[:200]}")
                    continue
                new = [d["id"] for d in r.json()["documents"]]
                gone = client.delete(f"/documents/{new[0]}", headers=AUTH)
                if gone.status_code != 200:
                    errors.append(f"delete: {gone.status_code} {gone.text[:200]}")
                with lock:
                    added.extend(new)
                    deleted.append(new[0])

        def read(r: int) -> None:
            while not done.is_set():
                res = client.post("/search", json={"text": f"writer {r} batch", "k": 5})
                if res.status_code != 200:
                    errors.append(f"search: {res.status_code} {res.text[:200]}")
                    continue
                for hit in res.json()["results"]:
                    image_gone = (
                        hit["images"] and client.get(hit["images"][0]["url"]).status_code != 200
                    )
                    if image_gone and client.get(f"/documents/{hit['id']}").status_code == 200:
                        errors.append(f"image of live document {hit['id']} missing")
                if client.get("/stats").status_code != 200:
                    errors.append("stats failed")

        def recording(fn: Any) -> Any:
            def run(arg: int) -> None:
                try:
                    fn(arg)
                except Exception as e:  # reported below, with the other failures
                    errors.append(f"{fn.__name__}: {e!r}")

            return run

        write_threads = [
            threading.Thread(target=recording(write), args=(w,)) for w in range(writers)
        ]
        read_threads = [threading.Thread(target=recording(read), args=(r,)) for r in range(readers)]
        for t in write_threads + read_threads:
            t.start()
        for t in write_threads:
            t.join(timeout=120)
        done.set()
        for t in read_threads:
            t.join(timeout=60)
        assert not errors, errors[:5]
        expected = writers * batches * (per_batch - 1)
        assert len(added) - len(deleted) == expected
        stats = client.get("/stats").json()
        assert stats["count"] == expected and stats["index"]["vectors"] == expected
        assert stats["deleted_total"] == len(deleted)
        hits = client.post("/search", json={"text": "writer", "k": 100}).json()["results"]
        assert {h["id"] for h in hits} <= set(added) - set(deleted)
    with Memory.open(memory_path, "a") as memory:  # the server released the write lock
        assert len(memory) == expected
        assert memory.contains(added) == set(added) - set(deleted)


# --- the command --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_mmrag_serve_process(tmp_path: Path) -> None:
    """`mmrag serve` in its own process: token from the environment, loopback, clean exit."""
    memory = tmp_path / "memory"
    port = free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN}
    cmd = [sys.executable, "-m", "mmrag.cli.main", "serve", str(memory), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--encoder", "hashing", "--no-access-log"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        docs = {"documents": [color_doc(n) for n in COLORS]}
        r = httpx.post(f"{base}/documents", json=docs, headers=AUTH, timeout=30)
        assert r.json()["added"] == len(COLORS)
        assert httpx.post(f"{base}/search", json={"text": "a square"}).json()["count"] == 6
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    log = out.decode()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log and "writes enabled" in log
    with Memory.open(memory, "a") as reopened:  # the write lock was released on shutdown
        assert len(reopened) == 6 and reopened.manifest.count == 6


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs Debian's wrk (apt-get install wrk)")
def test_bench_server_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/bench_server.py cannot rot: its quick load and mixed runs write sane JSON."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_server

    monkeypatch.setattr(bench_server, "WORK", tmp_path)
    out = tmp_path / "server-quick.json"
    assert (
        bench_server.main(["--quick", "--encoder", "hashing", "--skip", "st", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    for kind in ("text", "image"):
        load = result["load"][kind]
        assert load["requests"] > 0 and load["errors"] == 0 and load["requests_per_s"] > 0
        assert 0 < load["latency_ms"]["p50"] <= load["latency_ms"]["p99"]
    compare = result["compare"]
    assert set(compare["runs"]) == {
        "batched (shipped)",
        "one query per forward",
        "hashing encoder",
    }
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in compare["runs"].values())
    assert compare["in_process_encoder"]["batch_32_per_s"] > 0
    assert compare["ratios"]["batched_over_one_per_forward"] > 0
    assert compare["goals"]["no_errors"]
    mixed = result["mixed"]
    assert mixed["exact"] and mixed["added"] == 2 * 4 * 3 and mixed["deleted"] == 2 * 4
    assert mixed["count_after_restart"] == result["memory"]["docs"] + 16
    assert result["server_tracebacks"] == 0 and result["server_exit_code"] == 0


def test_non_finite_metadata_is_refused_and_the_memory_stays_searchable(
    client: TestClient, seeded: dict[str, str]
) -> None:
    """NaN in a JSON body's metadata (Python's JSON reads it) would break every metadata
    filter afterwards: it is a 422, and filtered search keeps working."""
    body = b'{"documents": [{"text": "a nan", "metadata": {"x": NaN}}]}'
    headers = {"Content-Type": "application/json", **AUTH}
    r = client.post("/documents", content=body, headers=headers)
    assert r.status_code == 422, r.text
    ok = client.post("/search", json={"text": "red", "filters": {"color": "red"}})
    assert ok.status_code == 200


def test_deeply_nested_form_json_is_a_422(client: TestClient, seeded: dict[str, str]) -> None:
    """Filters or metadata sent as multipart fields nested past any sane depth (or past
    Python's recursion limit) are a validation error, not a 500."""
    for depth in (65, 5000):
        nested = "[" * depth + "]" * depth
        for path, field, extra in (
            ("/search", "filters", {"text": "red"}),
            ("/documents", "metadata", {"text": "deep"}),
        ):
            r = client.post(
                path,
                files={"unused": ("x.txt", b"", "text/plain")},
                data={**extra, field: nested},
                headers=AUTH,
            )
            assert r.status_code == 422, (path, depth, r.text)
            assert "nested deeper than 64" in r.json()["detail"]
    assert client.post("/search", json={"text": "red"}).status_code == 200


def test_a_stalled_body_is_answered_408(memory_path: Path) -> None:
    """A client that announces more body than it sends does not hold a worker forever."""
    app = create_app(
        memory_path, token=TOKEN, encoder=HASHING, config=ServerConfig(body_read_timeout_s=0.5)
    )
    base, stop = serve_in_thread(app)
    try:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"text": '
            )
            start = time.monotonic()
            answer = b""
            while b"stalled" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
            assert time.monotonic() - start < 5
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"stalled for more than 0.5 s" in answer
        assert httpx.post(f"{base}/search", json={"text": "red"}, timeout=10).status_code == 200
    finally:
        stop()


def test_concurrent_searches_share_forwards_and_match_the_library(
    memory_path: Path, seeded: dict[str, str], client: TestClient
) -> None:
    """Searches sent at once are encoded in shared batches; each gets what the library's
    Retriever gives the same query alone (ids, and scores to 1e-6)."""
    queries = [f"a {name} square" for name in COLORS] * 4 + ["a poem", "blue", "red and green"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda q: client.post("/search", json={"text": q, "k": 3}), queries)
        )
    service = client.app.state.mmrag.service  # type: ignore[attr-defined]
    assert service.encoder.stats.calls >= len(queries)
    retriever = Retriever(service.memory)
    for query, answer in zip(queries, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got = [(h["id"], h["score"]) for h in answer.json()["results"]]
        expected = [(r.id, r.score) for r in retriever.search(text=query, k=3)]
        assert [i for i, _ in got] == [i for i, _ in expected], query
        assert all(abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(got, expected, strict=True))


def test_documents_over_the_ingest_limits_are_a_422(client: TestClient) -> None:
    """The API holds documents to the ingest's DocumentLimits (metadata size and depth)."""
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    for metadata, words in (
        (deep, "nested 41 levels deep, over the 32 limit"),
        ({"blob": "y" * 70_000}, "bytes of JSON, over the 65536 limit"),
    ):
        r = client.post(
            "/documents", json={"documents": [{"text": "x", "metadata": metadata}]}, headers=AUTH
        )
        assert r.status_code == 422, r.text
        assert words in r.json()["detail"]
