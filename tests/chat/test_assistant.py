"""Chat with FROMAGe over a memory built with the `fromage` encoder (tiny random LM)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLORS, png_bytes
from mmrag.chat import Chat, ChatOptions, ImagePart, Message, load_chat
from mmrag.documents import Document
from mmrag.encoders.base import EncoderSpec, load_encoder
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.models.fromage.encoder import FromageEncoder
from mmrag.models.fromage.language_model import tiny_language_model
from mmrag.models.fromage.model import FrozenLM, FrozenLMConfig, TokenRow
from mmrag.retrieval import Retriever

pytestmark = pytest.mark.pretrained  # EfficientNet-Lite0 image features


@pytest.fixture(scope="module")
def fromage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = FrozenLM(
        FrozenLMConfig(lm="tiny", retrieval_dim=16, img_tokens=2), tiny_language_model()
    )
    out = tmp_path_factory.mktemp("fromage")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def memory(fromage_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Memory]:
    path = tmp_path_factory.mktemp("mem") / "memory"
    docs = [
        Document.of(text=f"a {name} square", image=png_bytes(rgb, 32), metadata={"color": name})
        for name, rgb in COLORS.items()
    ]
    with ensure_memory(path, EncoderSpec(name="fromage", path=str(fromage_dir))) as m:
        ingest(m, docs, progress=False)
    with Memory.open(path) as m:
        yield m


def test_the_fromage_encoder_is_ret_and_wi_in_one_normalised_space(
    fromage_dir: Path, memory: Memory
) -> None:
    encoder = load_encoder(EncoderSpec(name="fromage", path=str(fromage_dir)))
    assert isinstance(encoder, FromageEncoder)
    text = encoder.encode_text(["a red square", "a blue square"])
    image = encoder.encode_image([Image.new("RGB", (32, 32), (230, 20, 20))])
    assert text.shape == (2, 16) and image.shape == (1, 16)
    assert np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    model = encoder.model
    state = model.special_states([TokenRow(model.encode_text("a red square"))], [model.ret_id])
    expected = model.adapters.project_text(state[:, 0]).numpy()
    assert np.allclose(text[0], expected[0], atol=1e-5)
    assert memory.manifest.fingerprint == encoder.fingerprint()
    assert len(memory) == len(COLORS)


def test_ret_tokens_retrieve_distinct_documents_with_evidence(memory: Memory) -> None:
    chat = Chat(memory.encoder.model, Retriever(memory))  # type: ignore[attr-defined]
    reply = chat.chat(
        [Message("user", ["Show me a red square."])],
        ChatOptions(max_new_tokens=3, ret_bias=1e4, k=2),
    )
    images = reply.images
    assert len(images) == 3 and all(p.source == "retrieved" and p.token == "[RET]" for p in images)
    ids = [p.document.id for p in images if p.document is not None]
    assert len(set(ids)) == 3  # a document shown once is not shown again
    assert all(len(p.evidence) == 2 and p.p_generate is None for p in images)
    payload = reply.to_json()
    assert [p["type"] for p in payload["parts"]] == ["image"] * 3
    first = payload["parts"][0]
    assert first["source"] == "retrieved" and first["document_id"] == ids[0]
    assert first["evidence"][0]["id"] == ids[0] and "score" in first["evidence"][0]
    json.dumps(payload)


def test_images_never_and_always(memory: Memory) -> None:
    chat = Chat(memory.encoder.model, Retriever(memory))  # type: ignore[attr-defined]
    message = [Message("user", ["Show me a red square.", Image.new("RGB", (32, 32), "blue")])]
    never = chat.chat(message, ChatOptions(max_new_tokens=4, ret_bias=1e4, images="never"))
    assert not never.images and never.text
    always = chat.chat(message, ChatOptions(max_new_tokens=4, ret_bias=-1e4, images="always"))
    assert isinstance(always.parts[-1], ImagePart) and len(always.images) == 1
    assert always.parts[-1].document is not None


def test_batched_chat_equals_one_at_a_time(memory: Memory) -> None:
    chat = Chat(memory.encoder.model, Retriever(memory))  # type: ignore[attr-defined]
    a = [Message("user", ["Show me a red square."])]
    b = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    opts = ChatOptions(max_new_tokens=5)
    together = chat.chat_batch([a, b], opts)
    assert [r.to_json() for r in together] == [
        chat.chat(a, opts).to_json(),
        chat.chat(b, opts).to_json(),
    ]


def test_chat_refuses_a_memory_of_another_encoder(hashing_memory: Memory) -> None:
    with pytest.raises(ValueError, match="fromage"):
        Chat(FrozenLM(FrozenLMConfig(lm="tiny"), tiny_language_model()), Retriever(hashing_memory))
    with pytest.raises(ValueError, match="fromage"):
        load_chat(hashing_memory, gill=False)


def test_mmrag_chat_one_turn_json(memory: Memory, capsys: pytest.CaptureFixture[str]) -> None:
    from mmrag.cli.main import main

    code = main(
        [
            "chat",
            str(memory.root),
            "--message",
            "Show me a cat.",
            "--json",
            "--no-gill",
            "--images",
            "always",
            "--max-tokens",
            "3",
            "-k",
            "2",
        ]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    kinds = [p["type"] for p in payload["parts"]]
    assert kinds[-1] == "image" and payload["parts"][-1]["source"] == "retrieved"
    assert len(payload["parts"][-1]["evidence"]) == 2


def test_server_chat_answers_with_provenance(memory: Memory) -> None:
    from fastapi.testclient import TestClient

    from mmrag.server import create_app
    from mmrag.server.chat_backend import with_chat

    always = ChatOptions(images="always")
    app = create_app(memory.root, capabilities=with_chat(gill=False, defaults=always))
    with TestClient(app) as client:
        assert client.get("/stats").json()["server"]["capabilities"]["chat"] is True
        body = {
            "messages": [{"role": "user", "parts": [{"text": "Show me a red square."}]}],
            "k": 2,
            "max_tokens": 2,
        }
        reply = client.post("/chat", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["message"]["role"] == "assistant" and data["message"]["parts"]
        image = data["message"]["parts"][-1]
        assert image["type"] == "image" and image["source"] == "retrieved"
        assert image["document_id"] in {e["id"] for e in data["evidence"]}
        assert image["image"]["url"].startswith("/images/") and image["p_generate"] is None


def test_demo_chat_section_runs_the_script(
    fromage_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmrag.checkpoints import ENV_VAR
    from mmrag.demo.chat import SCRIPT, chat_sections
    from mmrag.demo.report import _find

    root = tmp_path / "ckpt"
    (root / "fromage").mkdir(parents=True)
    for file in fromage_dir.iterdir():
        (root / "fromage" / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv(ENV_VAR, str(root))
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = []
    for name, emoji in (("pizza", "🍕"), ("red heart", "❤️"), ("cat", "🐈")):
        (data / "images" / f"{name}.png").write_bytes(png_bytes(COLORS["red"], 32, len(name)))
        meta = {"emoji": emoji, "base": emoji[0], "name": name}
        lines.append(json.dumps({"image": f"images/{name}.png", "text": name, "metadata": meta}))
    (data / "documents.jsonl").write_text("\n".join(lines) + "\n")
    sections = chat_sections(tmp_path / "out", [data], _find, progress=False, gill=False)
    assert [s["title"] for s in sections] == ["Chat: FROMAGe"]
    rows = sections[0]["rows"]
    assert len(rows) == len(SCRIPT) and rows[1]["query_image"].startswith("data:image/png")
    assert "left out" in rows[-1]["query"]  # the heart family excluded from the search
    assert all(row["results"] for row in rows)
