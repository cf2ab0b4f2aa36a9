"""Shared fixtures: tiny images, documents, and memories built with the hashing encoder."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from PIL import Image, ImageDraw

from mmrag.config import RetrieverConfig
from mmrag.documents import Document
from mmrag.encoders.base import EncoderSpec
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.models.ra_cm3.generator import Generator, GeneratorConfig
from mmrag.models.ra_cm3.model import RACM3, RACM3Config
from mmrag.models.ra_cm3.tokenizer import MultimodalTokenizer, TokenizerConfig
from mmrag.models.ra_cm3.train import RACM3TrainConfig
from mmrag.models.vq.model import VQConfig, VQModel

COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 30),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
}


def png_bytes(color: tuple[int, int, int], size: int = 16, pattern: int = 0) -> bytes:
    """A small PNG: a solid colour, optionally with a stripe so images of one colour differ."""
    img = Image.new("RGB", (size, size), color)
    if pattern:
        for x in range(size):
            img.putpixel((x, pattern % size), (128, 128, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    return png_bytes


@pytest.fixture
def color_docs() -> list[Document]:
    """One caption + image document per colour, with metadata."""
    return [
        Document.of(text=f"a {name} square", image=png_bytes(rgb), metadata={"color": name, "i": i})
        for i, (name, rgb) in enumerate(COLORS.items())
    ]


@pytest.fixture
def memory_path(tmp_path: Path) -> Path:
    return tmp_path / "memory"


HASHING = EncoderSpec(name="hashing")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    small matrices and tiny convolutions are dominated by thread synchronisation, and on
    shared cores two threads made such tests several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hashing_memory(memory_path: Path) -> Iterator[Memory]:
    memory = ensure_memory(memory_path, HASHING)
    yield memory
    memory.close()


@pytest.fixture
def color_memory(hashing_memory: Memory, color_docs: list[Document]) -> Memory:
    """The hashing memory holding `color_docs`."""
    ingest(hashing_memory, color_docs, progress=False)
    return hashing_memory


# --- RA-CM3: a tiny image + caption collection, a tiny VQ and a tiny training config ---------

SHAPE_COLOURS = [(220, 20, 20), (20, 160, 40), (30, 60, 220), (240, 200, 20)]
SHAPES = ("disc", "square", "bar")


def write_shapes_dataset(folder: Path) -> Path:
    """12 documents: 4 colour groups (metadata base) x 3 shapes on white."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, rgb in enumerate(SHAPE_COLOURS):
        for shape in SHAPES:
            img = Image.new("RGB", (32, 32), (255, 255, 255))
            draw = ImageDraw.Draw(img)
            box = (6, 6, 26, 26) if shape != "bar" else (4, 12, 28, 20)
            (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=rgb)
            file = f"images/{i}-{shape}.png"
            img.save(folder / file)
            parts = [{"image": file}, {"text": f"a {shape} of colour {i}"}]
            meta = {"base": f"c{i}", "name": f"{shape} {i}"}
            lines.append(json.dumps({"parts": parts, "metadata": meta}))
    (folder / "documents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    return write_shapes_dataset(tmp_path / "data")


@pytest.fixture
def tiny_vq_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    VQModel(VQConfig.preset("tiny")).save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def tiny_ra_cm3_config(**changes: object) -> RACM3TrainConfig:
    """A few steps of a tiny generator over 64-token images (the tiny VQ's 8 x 8 grid)."""
    base = RACM3TrainConfig(
        generator=GeneratorConfig.preset("tiny").replace(vocab_size=320, max_seq_len=384),
        tokenizer=TokenizerConfig(text_vocab_size=270, bpe_min_frequency=1),
        retriever=RetrieverConfig.preset("training").replace(relevance_cap=None),
        query_variants=2,
        tokens_per_step=400,
        steps=4,
        warmup_steps=1,
        holdout=0.5,
        eval_every=2,
        save_every=2,
        val_docs=2,
    )
    return base.replace(**changes)


def build_tiny_racm3(
    max_seq_len: int = 384,
    memory: Memory | None = None,
    hint_slots: int = 0,
    text_hints: bool = False,
    same_document_slot: bool = False,
) -> RACM3:
    """A random RA-CM3 on 16 px images (64 codes each) retrieving from `memory`, with
    `hint_slots` copy-hint tables (and text copy hints, and the last slot kept for the same
    document)."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig.preset("tiny"))
    captions = ["a red square", "a green square", "a blue disc", "a yellow bar"] * 3
    tok_config = TokenizerConfig(
        text_vocab_size=270,
        bpe_min_frequency=1,
        image_codes=vq.config.codebook_size,
        image_tokens=vq.config.tokens_per_image,
    )
    tok = MultimodalTokenizer.train(captions, tok_config)
    hints = {
        "hint_slots": hint_slots,
        "hint_codes": vq.config.codebook_size if hint_slots else 0,
        "text_hints": text_hints,
    }
    gen = Generator(
        GeneratorConfig.preset("tiny").replace(vocab_size=320, max_seq_len=max_seq_len, **hints)
    )
    config = RACM3Config(
        samples=2,
        caption_samples=3,
        max_caption_tokens=8,
        same_document_slot=same_document_slot,
    )
    return RACM3(gen, tok, vq, config, memory)


def trusting_racm3(memory: Memory) -> RACM3:
    """A tiny RA-CM3 whose slot-0 hint of code c points at the head row of code c, with a
    sharp output: it writes what its top retrieved image holds at each cell."""
    model = build_tiny_racm3(memory=memory, hint_slots=2)
    gen, tok = model.generator, model.tokenizer
    assert gen.hints is not None
    n = tok.config.image_codes
    with torch.no_grad():
        gen.hints.weight.zero_()
        gen.hints.weight[:n] = 50 * gen.head.weight[tok.image_offset : tok.image_offset + n]
        gen.norm.weight.fill_(30.0)
    return model


def serve_in_thread(app: Any) -> tuple[str, Callable[[], None]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return f"http://127.0.0.1:{port}", stop
