"""`hf_clip` adapter on a tiny random CLIP saved to a folder (no weights needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.encoders.hf_clip import HFClipEncoder

transformers = pytest.importorskip("transformers")

PROJECTION_DIM = 16
IMAGE_SIDE = 30
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
MERGES = ["r e", "re d</w>", "b l", "bl u", "blu e</w>"]
TEXTS = ["red", "blue square", "a green circle", "red red red blue"]


def _write_tokenizer_files(folder: Path) -> int:
    vocab = [
        *SPECIALS,
        *LETTERS,
        *(c + "</w>" for c in LETTERS),
        "re",
        "red</w>",
        "bl",
        "blu",
        "blue</w>",
    ]
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8"
    )
    return len(vocab)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab_size = _write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIDE,
        "patch_size": 10,
    }
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)
    CLIPModel(config).save_pretrained(str(folder))
    side = {"shortest_edge": IMAGE_SIDE}
    crop = {"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    CLIPImageProcessorPil(size=side, crop_size=crop).save_pretrained(str(folder))
    return folder


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)),
        Image.new("RGB", (30, 30), (255, 0, 0)),
        Image.new("RGBA", (64, 48), (0, 0, 255, 128)),
    ]


@pytest.fixture(scope="module")
def encoder(clip_folder: Path) -> HFClipEncoder:
    return HFClipEncoder.from_pretrained(clip_folder, batch_size=2)


def test_vectors_are_normalised_with_the_projection_width(encoder: HFClipEncoder) -> None:
    assert isinstance(encoder, Encoder)
    assert encoder.name == "hf_clip"
    assert encoder.dim == PROJECTION_DIM
    for vectors, n in (
        (encoder.encode_text(TEXTS), len(TEXTS)),
        (encoder.encode_image(_images()), 3),
    ):
        assert vectors.dtype == np.float32
        assert vectors.shape == (n, PROJECTION_DIM)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_text([]).shape == (0, PROJECTION_DIM)


def test_similarities_match_a_direct_clip_forward(
    encoder: HFClipEncoder, clip_folder: Path
) -> None:
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(str(clip_folder)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_folder))
    processor = CLIPImageProcessorPil.from_pretrained(str(clip_folder))
    images = [img.convert("RGB") for img in _images()[:2]]  # opaque: no flattening involved
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(**tokens, pixel_values=pixels)
        expected = (out.logits_per_text / model.logit_scale.exp()).numpy()  # cosines
    got = encoder.encode_text(TEXTS) @ encoder.encode_image(images).T
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(got) > 1e-3  # random weights still separate the inputs


def test_registry_loads_it_and_fingerprint_tracks_weights(
    clip_folder: Path, tmp_path: Path
) -> None:
    spec = EncoderSpec(name="hf_clip", path=str(clip_folder), batch_size=3)
    loaded = load_encoder(spec)
    assert isinstance(loaded, HFClipEncoder)
    assert loaded.fingerprint() == HFClipEncoder.from_pretrained(clip_folder).fingerprint()

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_folder))
    with torch.no_grad():
        model.text_projection.weight.mul_(2.0)
    copy = tmp_path / "changed"
    model.save_pretrained(str(copy))
    for f in clip_folder.iterdir():
        if not (copy / f.name).exists():
            (copy / f.name).write_bytes(f.read_bytes())
    assert HFClipEncoder.from_pretrained(copy).fingerprint() != loaded.fingerprint()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Hugging Face CLIP checkpoint"):
        HFClipEncoder.from_pretrained(tmp_path)
