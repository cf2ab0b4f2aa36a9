"""The `lite` encoder: frozen packaged towers, trained heads, persistence and fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrag.config import ConfigError, LiteEncoderConfig
from mmrag.documents import to_rgb
from mmrag.encoders.base import Encoder
from mmrag.encoders.lite import (
    LiteEncoder,
    LiteHeads,
    identity_json,
    image_batch,
    image_tower,
    square_crop,
    text_tower,
)

TINY = LiteEncoderConfig(dim=32)
TEXTS = ["grinning face", "red apple", "woman dancing: medium skin tone"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.new("RGB", (128, 128), (220, 30, 30)),
        Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)),
        Image.new("RGBA", (64, 64), (0, 0, 0, 0)),  # fully transparent: must become white
    ]


def test_preprocessing_square_crop_and_range() -> None:
    wide = Image.new("RGB", (200, 100))
    wide.paste((255, 255, 255), (0, 0, 40, 100))  # inside the left quarter, cropped away
    assert square_crop(wide, 64).size == (64, 64)
    assert np.asarray(square_crop(wide, 64)).max() == 0
    assert np.asarray(to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))).min() == 255
    x = image_batch([Image.new("RGB", (10, 30), (0, 255, 0))], 32)
    assert x.shape == (1, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, 0].max() == -1.0
    assert x[0, 1].min() == 1.0


def test_heads_round_trip_without_towers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = LiteEncoder(TINY)
    encoder.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = LiteEncoder.from_pretrained(tmp_path)
    assert again.config == TINY
    feats = np.random.default_rng(1).standard_normal((5, 1280)).astype(np.float32)
    np.testing.assert_array_equal(encoder.project_image(feats), again.project_image(feats))


def test_strict_load_rejects_mismatched_heads(tmp_path: Path) -> None:
    LiteEncoder(TINY).save_pretrained(tmp_path)
    LiteEncoderConfig(dim=16).save(tmp_path / "config.json")
    with pytest.raises(RuntimeError, match="size mismatch"):
        LiteEncoder.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def encoder() -> LiteEncoder:
    torch.manual_seed(0)
    return LiteEncoder(TINY, LiteHeads(TINY), batch_size=2)


@pytest.mark.pretrained
def test_outputs_are_normalised_float32_and_deterministic(encoder: LiteEncoder) -> None:
    assert isinstance(encoder, Encoder)
    assert encoder.name == "lite"
    assert encoder.dim == 32
    for make in (lambda: encoder.encode_text(TEXTS), lambda: encoder.encode_image(_images())):
        first, second = make(), make()
        assert first.dtype == np.float32
        assert first.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(first, second)
    assert encoder.encode_text([]).shape == (0, 32)
    assert encoder.encode_image([]).shape == (0, 32)


@pytest.mark.pretrained
def test_raw_features_have_the_tower_widths(encoder: LiteEncoder) -> None:
    image = encoder.image_features(_images())
    text = encoder.text_features(TEXTS)
    assert image.shape == (3, 1280)
    assert text.shape == (3, 384)
    assert image.min() >= 0.0  # pooled ReLU6 activations
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    # Batching does not change a row (batch_size=2 splits these three).
    np.testing.assert_array_equal(encoder.text_features(TEXTS[2:]), text[2:])  # no padding
    np.testing.assert_allclose(encoder.image_features(_images()[2:]), image[2:], atol=1e-4)


@pytest.mark.pretrained
def test_text_tower_runs_the_scripted_forward() -> None:
    tower = text_tower()
    assert tower._scripted is not None  # MiniLM is a plain BERT: the GIL-free forward
    texts = [*TEXTS, "red heart", "a photo of a cat"]  # two token counts share a batch
    scripted = tower.features(texts, TINY.text_max_tokens, batch_size=8)
    tower._scripted, kept = None, tower._scripted
    try:
        module = tower.features(texts, TINY.text_max_tokens, batch_size=8)
    finally:
        tower._scripted = kept
    np.testing.assert_allclose(scripted, module, rtol=0, atol=1e-6)


@pytest.mark.pretrained
def test_image_tower_runs_the_traced_features_bit_for_bit(encoder: LiteEncoder) -> None:
    traced = encoder.image_features(_images())
    tower = image_tower(encoder.device)
    assert tower._traced[TINY.image_size] is not None  # traced on first use, per crop size
    x = image_batch(_images(), TINY.image_size)
    with torch.inference_mode():
        np.testing.assert_array_equal(traced, tower.model.features(x).numpy())


@pytest.mark.pretrained
def test_text_tower_is_semantic(encoder: LiteEncoder) -> None:
    text = encoder.text_features(["a red apple", "a crimson apple", "a rocket launch"])
    sims = text @ text.T
    assert sims[0, 1] > sims[0, 2] + 0.2


@pytest.mark.pretrained
def test_text_matches_sentence_transformers_when_installed(encoder: LiteEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    from mmrag.encoders.lite import text_model_path

    model = st.SentenceTransformer(str(text_model_path()), device="cpu")
    model.max_seq_length = TINY.text_max_tokens
    expected = model.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(encoder.text_features(TEXTS), expected, atol=1e-5)


@pytest.mark.pretrained
def test_save_load_gives_identical_vectors_and_fingerprint(
    encoder: LiteEncoder, tmp_path: Path
) -> None:
    encoder.save_pretrained(tmp_path)
    again = LiteEncoder.from_pretrained(tmp_path, batch_size=encoder.batch_size)
    np.testing.assert_array_equal(again.encode_text(TEXTS), encoder.encode_text(TEXTS))
    np.testing.assert_array_equal(again.encode_image(_images()), encoder.encode_image(_images()))
    assert again.fingerprint() == encoder.fingerprint()
    assert again.fingerprint().startswith("lite-")


@pytest.mark.pretrained
def test_changed_heads_or_config_change_the_fingerprint(encoder: LiteEncoder) -> None:
    heads = LiteHeads(TINY)
    heads.load_state_dict(encoder.heads.state_dict())
    assert LiteEncoder(TINY, heads).fingerprint() == encoder.fingerprint()
    with torch.no_grad():
        heads.text_proj.weight[0, 0] += 1e-3
    assert LiteEncoder(TINY, heads).fingerprint() != encoder.fingerprint()
    other = LiteEncoderConfig(dim=32, image_size=160)
    moved = LiteHeads(other)
    moved.load_state_dict(encoder.heads.state_dict())
    assert LiteEncoder(other, moved).fingerprint() != encoder.fingerprint()


@pytest.mark.pretrained
def test_shipped_heads_load_by_default_and_match_captions_to_photos() -> None:
    shipped = LiteEncoder.from_pretrained(None)  # checkpoints/lite-encoder, committed
    data = pytest.importorskip("skimage.data")
    assert shipped.dim == 384 and shipped.config.bridged
    photos = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    captions = ["coffee in a cup", "a cat", "a rocket", "the flag of Japan"]
    sims = shipped.encode_image(photos) @ shipped.encode_text(captions).T  # (2, 4)
    assert sims.argmax(axis=1).tolist() == [0, 1]


@pytest.mark.pretrained
def test_text_encoding_is_thread_safe(encoder: LiteEncoder) -> None:
    """The Rust tokenizer raises "Already borrowed" when two threads use it at once; the
    tower serialises tokenisation, so concurrent callers (the server) need no lock."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"a picture of thing number {i} on a white background" for i in range(16)]
    expected = encoder.encode_text(texts)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: encoder.encode_text(texts), range(12)))
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.pretrained
def test_shared_image_features_run_the_tower_once_per_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mmrag.encoders import lite

    tower = lite.image_tower("cpu")
    calls: list[int] = []
    forward = tower._forward

    def counting(x: torch.Tensor, size: int) -> torch.Tensor:
        calls.append(len(x))
        return forward(x, size)

    monkeypatch.setattr(tower, "_forward", counting)
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255))
    plain = tower.features([red, blue], 32, batch_size=8)
    with lite.shared_image_features(max_images=4):
        first = tower.features([red, blue], 32, batch_size=8)
        again = tower.features([blue.copy(), red], 32, batch_size=8)  # same content: cached
        other_size = tower.features([red], 48, batch_size=8)  # another crop: computed
    assert calls == [2, 2, 1]
    np.testing.assert_allclose(first, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again, first[::-1])
    assert other_size.shape == (1, 1280)
    assert not tower._cache  # emptied when the block ends
    tower.features([red], 32, batch_size=8)
    assert calls == [2, 2, 1, 1]  # and off again


# --- the class bridge ------------------------------------------------------------------------

BRIDGED = LiteEncoderConfig(dim=384, bridge_classes=5, bridge_top_k=2, bridge_temperature=0.5)


def _bridged_heads(seed: int = 0) -> LiteHeads:
    torch.manual_seed(seed)
    heads = LiteHeads(BRIDGED)
    assert heads.bridge is not None
    names = torch.nn.functional.normalize(torch.randn(5, 384), dim=-1)
    heads.bridge.class_text.copy_(names.half())
    heads.bridge.attach_classifier(torch.nn.Linear(1280, 5))
    return heads


def test_untrained_bridged_heads_are_conse() -> None:
    """Zero residuals: an image is the softmax-weighted mean of its top-k class names'
    embeddings (Norouzi et al. 2014), a text its own MiniLM embedding."""
    heads = _bridged_heads()
    assert heads.bridge is not None
    features = torch.randn(4, 1280)
    logits = heads.bridge.logits(features)
    probs = torch.softmax(logits / 0.5, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    names = heads.bridge.class_text.float()
    expected = torch.stack([(top[i, :, None] * names[idx[i]]).sum(0) for i in range(4)])
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(heads.project_image(features), expected)
    text = torch.nn.functional.normalize(torch.randn(3, 384), dim=-1)
    torch.testing.assert_close(heads.project_text(text), text)


def test_bridge_needs_its_classifier_and_a_text_sized_space() -> None:
    heads = LiteHeads(BRIDGED)
    with pytest.raises(RuntimeError, match="attach_classifier"):
        heads.project_image(torch.randn(1, 1280))
    with pytest.raises(ValueError, match="classifier"):
        heads.bridge.attach_classifier(torch.nn.Linear(1280, 7))  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="text_feature_dim"):
        LiteEncoderConfig(dim=256, bridge_classes=5)


def test_bridged_heads_store_float16_and_measure_what_they_store() -> None:
    heads = _bridged_heads()
    with torch.no_grad():
        for weight in heads.projections():
            weight.normal_()
    heads.round_to_storage_()
    state = heads.storage_state()
    assert state["image_proj.weight"].dtype == torch.float16
    assert state["bridge.class_text"].dtype == torch.float16
    assert state["logit_scale"].dtype == torch.float32
    assert "bridge.weight" not in state  # the classifier is the frozen tower's, not stored
    again = LiteHeads(BRIDGED)
    again.load_state_dict(state, strict=True)
    torch.testing.assert_close(again.image_proj.weight, heads.image_proj.weight, rtol=0, atol=0)


def test_plain_heads_keep_their_fingerprint_identity() -> None:
    assert "bridge" not in identity_json(LiteEncoderConfig())
    assert "bridge_classes" in identity_json(BRIDGED)
    assert "bridge_share" not in identity_json(BRIDGED)  # heads from before the share existed
    shared = dataclasses.replace(BRIDGED, bridge_share=0.3)
    assert '"bridge_share": 0.3' in identity_json(shared)


def test_bridge_share_mixes_the_untrained_vectors_back_in() -> None:
    """image = normalise((1 - s) * normalise(bridge + residual) + s * bridge), text likewise
    with its MiniLM embedding; with zero residuals it is the bridge itself."""
    shared = dataclasses.replace(BRIDGED, bridge_share=0.3)
    torch.manual_seed(0)
    heads, plain = LiteHeads(shared), _bridged_heads()
    heads.load_state_dict(plain.state_dict())
    assert heads.bridge is not None and plain.bridge is not None
    heads.bridge.attach_classifier(torch.nn.Linear(1280, 5))
    with torch.no_grad():
        heads.bridge.weight.copy_(plain.bridge.weight)
        heads.bridge.bias.copy_(plain.bridge.bias)
    features = torch.randn(4, 1280)
    text = torch.nn.functional.normalize(torch.randn(3, 384), dim=-1)
    torch.testing.assert_close(heads.project_image(features), plain.project_image(features))
    torch.testing.assert_close(heads.project_text(text), text)
    image_residual, text_residual = torch.randn(384, 1280) * 0.1, torch.randn(384, 384) * 0.1
    with torch.no_grad():
        for model in (heads, plain):
            model.image_proj.weight.copy_(image_residual)
            model.text_proj.weight.copy_(text_residual)
    bridge = plain.bridge(features)
    mixed = 0.7 * plain.project_image(features) + 0.3 * bridge
    expected = torch.nn.functional.normalize(mixed, dim=-1)
    torch.testing.assert_close(heads.project_image(features), expected)
    text_mixed = 0.7 * plain.project_text(text) + 0.3 * text
    expected_text = torch.nn.functional.normalize(text_mixed, dim=-1)
    torch.testing.assert_close(heads.project_text(text), expected_text)
    # The share bounds the residual's pull: a huge residual leaves 0.3 of the bridge.
    with torch.no_grad():
        heads.image_proj.weight.mul_(1e6)
    cos = (heads.project_image(features) * bridge).sum(-1)
    assert bool((cos > 0.29).all())


def test_bridge_share_needs_the_bridge_and_a_fraction() -> None:
    with pytest.raises(ConfigError, match="bridge_share"):
        LiteEncoderConfig(bridge_share=0.3)
    with pytest.raises(ConfigError, match="bridge_share"):
        dataclasses.replace(BRIDGED, bridge_share=1.0)


@pytest.mark.pretrained
def test_bridged_encoder_round_trip_with_the_packaged_classifier(tmp_path: Path) -> None:
    config = LiteEncoderConfig(dim=384, bridge_classes=1000)
    torch.manual_seed(0)
    heads = LiteHeads(config)
    assert heads.bridge is not None
    heads.bridge.class_text.copy_(torch.nn.functional.normalize(torch.randn(1000, 384), dim=-1))
    encoder = LiteEncoder(config, heads)  # attaches the packaged tower's classifier
    encoder.save_pretrained(tmp_path)
    again = LiteEncoder.from_pretrained(tmp_path)
    assert again.fingerprint() == encoder.fingerprint()
    images = _images()
    np.testing.assert_array_equal(encoder.encode_image(images), again.encode_image(images))
    vectors = again.encode_text(TEXTS)
    assert vectors.shape == (3, 384)
