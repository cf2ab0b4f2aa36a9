"""The chat (tiny random LM): grounded replies over any memory, and FROMAGe token decoding
over a memory built with the `fromage` encoder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLORS, HASHING, png_bytes
from mmrag.chat import Chat, ChatOptions, ImagePart, Message, load_chat
from mmrag.chat.query_head import EncoderMismatchError, QueryHead, QueryHeadConfig
from mmrag.chat.request import MAX_IMAGES, RequestConfig, RequestDecision, requested_count
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


def test_tokens_mode_ret_tokens_retrieve_distinct_documents_with_evidence(memory: Memory) -> None:
    chat = Chat(memory.encoder.model, Retriever(memory))  # type: ignore[attr-defined]
    reply = chat.chat(
        [Message("user", ["Show me a red square."])],
        ChatOptions(max_new_tokens=3, ret_bias=1e4, k=2, mode="tokens"),
    )
    images = reply.images
    assert len(images) == 3 and all(p.source == "retrieved" and p.token == "[RET]" for p in images)
    ids = [p.document.id for p in images if p.document is not None]
    assert len(set(ids)) == 3  # a document shown once is not shown again
    assert all(len(p.evidence) == 2 and p.p_generate is None for p in images)
    payload = reply.to_json()
    assert [p["type"] for p in payload["parts"]] == ["image"] * 3
    assert payload["evidence"] == []  # token decoding retrieves per image, not per turn
    first = payload["parts"][0]
    assert first["source"] == "retrieved" and first["document_id"] == ids[0]
    assert first["evidence"][0]["id"] == ids[0] and "score" in first["evidence"][0]
    json.dumps(payload)


def test_images_never_and_always(memory: Memory) -> None:
    chat = Chat(memory.encoder.model, Retriever(memory))  # type: ignore[attr-defined]
    message = [Message("user", ["Show me a red square.", Image.new("RGB", (32, 32), "blue")])]
    never = chat.chat(
        message, ChatOptions(max_new_tokens=4, ret_bias=1e4, images="never", mode="tokens")
    )
    assert not never.images and never.text
    always = chat.chat(
        message, ChatOptions(max_new_tokens=4, ret_bias=-1e4, images="always", mode="tokens")
    )
    assert isinstance(always.parts[-1], ImagePart) and len(always.images) == 1
    assert always.parts[-1].document is not None


def test_batched_chat_equals_one_at_a_time(memory: Memory) -> None:
    chat = Chat(memory.encoder.model, Retriever(memory))  # type: ignore[attr-defined]
    a = [Message("user", ["Show me a red square."])]
    b = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    opts = ChatOptions(max_new_tokens=5, mode="tokens")
    together = chat.chat_batch([a, b], opts)
    assert [r.to_json() for r in together] == [
        chat.chat(a, opts).to_json(),
        chat.chat(b, opts).to_json(),
    ]


def test_tokens_mode_needs_a_fromage_memory(hashing_memory: Memory) -> None:
    chat = Chat(
        FrozenLM(FrozenLMConfig(lm="tiny"), tiny_language_model()), Retriever(hashing_memory)
    )
    with pytest.raises(ValueError, match="fromage"):
        chat.chat([Message("user", ["hi"])], ChatOptions(mode="tokens"))


# --- grounded replies over any memory ---------------------------------------------------------


@pytest.fixture
def tiny_checkpoints(fromage_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$MMRAG_CHECKPOINTS with the tiny FROMAGe and an image decision fitted on its LM."""
    from mmrag.checkpoints import ENV_VAR

    root = tmp_path / "ckpt"
    (root / "fromage").mkdir(parents=True)
    for file in fromage_dir.iterdir():
        (root / "fromage" / file.name).write_bytes(file.read_bytes())
    model = FrozenLM.from_pretrained(fromage_dir)
    _decision(model, always=True).save_pretrained(root / "chat")
    monkeypatch.setenv(ENV_VAR, str(root))
    return root


def _decision(model: FrozenLM, always: bool) -> RequestDecision:
    hidden = model.language_model.hidden_size
    config = RequestConfig(hidden=hidden, lm_identity=model.language_model.identity)
    head = RequestDecision(config)
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.fill_(20.0 if always else -20.0)
    return head


@pytest.fixture
def grounded(color_memory: Memory, fromage_dir: Path) -> Chat:
    return Chat(FrozenLM.from_pretrained(fromage_dir), Retriever(color_memory))


def test_a_grounded_reply_is_words_with_the_turns_evidence(grounded: Chat) -> None:
    reply = grounded.chat([Message("user", ["a red square"])], ChatOptions(max_new_tokens=4, k=2))
    assert reply.text and isinstance(reply.parts[0], str) and not reply.images
    assert [e.text for e in reply.evidence][:1] == ["a red square"]
    assert reply.p_image is None  # no decision: words only
    payload = reply.to_json()
    assert payload["evidence"][0]["id"] == reply.evidence[0].id
    bare = grounded.chat([Message("user", ["a red square"])], ChatOptions(retrieval=False))
    assert bare.text and bare.evidence == []


def test_an_attached_image_retrieves_by_the_image(grounded: Chat) -> None:
    blue = Image.open(__import__("io").BytesIO(png_bytes(COLORS["blue"], 32)))
    reply = grounded.chat([Message("user", [blue, "What is this?"])], ChatOptions(k=1))
    assert reply.evidence[0].text == "a blue square"
    note = grounded._note(
        grounded._turn([Message("user", [blue, "What is this?"])], ChatOptions(k=1)), ChatOptions()
    )
    assert note == "[The attached image shows: a blue square.]"


def test_the_decision_shows_images_only_when_asked(grounded: Chat) -> None:
    request = [Message("user", ["Show me two pictures of a green square."])]
    grounded.decision = _decision(grounded.model, always=False)
    reply = grounded.chat(request, ChatOptions(k=2))
    assert not reply.images and reply.text and reply.p_image is not None and reply.p_image < 0.01
    grounded.decision = _decision(grounded.model, always=True)
    reply = grounded.chat(request, ChatOptions(k=2))
    assert isinstance(reply.parts[0], str) and reply.text  # words first, always
    assert len(reply.images) == 2  # as many as asked for
    first, second = (p.document for p in reply.images)
    assert first is not None and second is not None
    assert first.text == "a green square" and second.id != first.id
    never = grounded.chat(request, ChatOptions(images="never"))
    assert not never.images and never.p_image is None


def test_requested_count() -> None:
    assert requested_count("Show me a cat.") == 1
    assert requested_count("Show me two pictures of cats") == 2
    assert requested_count("3 images of dogs please") == 3
    assert requested_count("show me 40 photos") == MAX_IMAGES


def test_a_decision_fitted_on_another_lm_is_refused(tmp_path: Path, fromage_dir: Path) -> None:
    model = FrozenLM.from_pretrained(fromage_dir)
    head = _decision(model, always=True)
    head.save_pretrained(tmp_path / "chat")
    loaded = RequestDecision.from_pretrained(tmp_path / "chat", model.language_model.identity)
    states = torch.randn(3, model.language_model.hidden_size)
    assert torch.equal(loaded.probability(states), head.probability(states))
    with pytest.raises(ValueError, match="another language model"):
        RequestDecision.from_pretrained(tmp_path / "chat", "gguf:other")


def test_load_chat_works_over_any_memory(color_memory: Memory, tiny_checkpoints: Path) -> None:
    chat = load_chat(color_memory, gill=False)
    assert chat.decision is not None and chat.maker is None
    reply = chat.chat([Message("user", ["Show me a red square."])], ChatOptions(max_new_tokens=3))
    assert reply.text and reply.images and reply.images[0].document is not None
    assert reply.images[0].document.text == "a red square"


def test_mmrag_chat_one_turn_json(
    color_memory: Memory, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmrag.cli.main import main

    root = color_memory.root
    color_memory.close()
    argv = ["chat", str(root), "--message", "Show me a cat.", "--json", "--no-gill"]
    code = main([*argv, "--max-tokens", "3", "-k", "2"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    kinds = [p["type"] for p in payload["parts"]]
    assert kinds[0] == "text" and kinds[-1] == "image"
    assert payload["parts"][-1]["source"] == "retrieved"
    assert len(payload["parts"][-1]["evidence"]) == 2 and len(payload["evidence"]) == 2
    assert payload["p_image"] > 0.99


def test_server_chat_answers_with_provenance(color_memory: Memory, tiny_checkpoints: Path) -> None:
    from fastapi.testclient import TestClient

    from mmrag.server import create_app
    from mmrag.server.chat_backend import with_chat

    root = color_memory.root
    color_memory.close()
    app = create_app(root, capabilities=with_chat(gill=False))
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
        assert data["message"]["parts"][0]["type"] == "text"
        image = data["message"]["parts"][-1]
        assert image["type"] == "image" and image["source"] == "retrieved"
        assert image["document_id"] in {e["id"] for e in data["evidence"]}
        assert image["image"]["url"].startswith("/images/") and image["p_generate"] is None


def test_demo_chat_section_runs_the_script(tiny_checkpoints: Path, tmp_path: Path) -> None:
    from mmrag.demo.chat import SCRIPT, chat_sections
    from mmrag.demo.report import _find

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    docs = []
    for name, emoji in (("pizza", "🍕"), ("red heart", "❤️"), ("cat", "🐈")):
        meta = {"emoji": emoji, "base": emoji[0], "name": name, "dataset": "emoji"}
        docs.append(
            Document.of(text=name, image=png_bytes(COLORS["red"], 32, len(name)), metadata=meta)
        )
    with ensure_memory(tmp_path / "mem", HASHING) as memory:
        ingest(memory, docs, progress=False)
        sections = chat_sections(memory, _find, gill=False)
    assert [s["title"] for s in sections] == ["Chat: FROMAGe"]
    rows = sections[0]["rows"]
    assert len(rows) == len(SCRIPT) and rows[2]["query_image"].startswith("data:image/png")
    assert "left out" in rows[-1]["query"]  # the heart family excluded from the search
    assert all(row["results"][0]["id"] == "text" for row in rows)  # every reply has words


def test_a_query_head_maps_requests_into_the_memorys_space(
    color_memory: Memory, fromage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = FrozenLM.from_pretrained(fromage_dir)
    manifest = color_memory.manifest
    config = QueryHeadConfig(
        hidden=model.language_model.hidden_size,
        dim=manifest.dim,
        encoder=manifest.encoder.name,
        fingerprint=manifest.fingerprint,
        blend=0.0,
    )
    chat = Chat(model, Retriever(color_memory), query_head=QueryHead(config))
    turn = chat._turn([Message("user", ["Show me a blue square."])], ChatOptions(images="never"))
    text_only = chat.retriever.encode("Show me a blue square.", None)
    assert np.allclose(chat._image_query(turn), text_only)  # blend 0: the text query
    chat.query_head = QueryHead(config.replace(blend=1.0))
    blended = chat._image_query(turn)
    assert blended.shape == text_only.shape and abs(float(np.linalg.norm(blended)) - 1) < 1e-5
    other = QueryHead(config.replace(fingerprint="other"))
    with pytest.raises(EncoderMismatchError, match="retrain it"):
        Chat(model, Retriever(color_memory), query_head=other)
