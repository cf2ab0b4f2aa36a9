"""LiT-style head training on a tiny synthetic set of solid colours."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrag.checkpoints import checkpoint_dir
from mmrag.config import EncoderTrainConfig, LiteEncoderConfig
from mmrag.encoders.lite import LiteEncoder, LiteHeads
from mmrag.encoders.lite_train import (
    BridgeInit,
    Split,
    build_parser,
    fit_heads,
    info_nce,
    main,
    new_heads,
    retrieval_metrics,
    train_encoder,
)
from tiny_data import write_encoder_pairs

CONFIG = EncoderTrainConfig(
    encoder=LiteEncoderConfig(dim=32),
    holdout=2 / 12,  # each colour group held out with probability 1/6, else validates with 1/6
    seed=0,
    epochs=30,
    batch_size=8,
    lr=1e-2,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("share", [0.0, 0.4])
def test_bridged_training_starts_from_the_bridge_and_improves_on_it(share: float) -> None:
    """A bridged run on the shared-latent toy: epoch 0 is the zero-shot bridge, training adds
    residuals that beat it on unseen pairs (also with a share of the bridge kept)."""
    rng = np.random.default_rng(0)
    maps = (
        rng.standard_normal((16, 1280)).astype(np.float32) / 4,
        rng.standard_normal((16, 384)).astype(np.float32) / 4,
    )
    train, val, test = (_latent_split(rng, n, maps) for n in (256, 64, 128))
    encoder = LiteEncoderConfig(dim=384, bridge_classes=8, bridge_top_k=3, bridge_share=share)
    config = EncoderTrainConfig(encoder=encoder, epochs=10, batch_size=64)
    torch.manual_seed(1)
    bridge = BridgeInit(
        torch.nn.functional.normalize(torch.randn(8, 384), dim=-1), torch.nn.Linear(1280, 8)
    )
    torch.manual_seed(0)
    start = new_heads(config, bridge)
    assert all(not w.detach().any() for w in start.projections())
    with pytest.raises(ValueError, match="BridgeInit"):
        new_heads(config)
    heads, _ = fit_heads(train, val, config, progress=False, bridge=bridge)
    args = (test.image.numpy(), test.text.numpy(), test.matches)
    assert (
        retrieval_metrics(heads, *args)["t2i_r1"] > 0.5 > retrieval_metrics(start, *args)["t2i_r1"]
    )


def test_info_nce_masks_false_negatives_and_backpropagates() -> None:
    torch.manual_seed(0)
    heads = LiteHeads(LiteEncoderConfig(dim=8))
    image, text = torch.randn(4, 1280), torch.randn(4, 384)
    none = torch.zeros(4, 4, dtype=torch.bool)
    loss = info_nce(heads, image, text, none)
    loss.backward()
    assert torch.isfinite(loss)
    assert heads.image_proj.weight.grad is not None
    assert float(heads.logit_scale.grad or 0.0) != 0.0
    everything_same = torch.ones(4, 4, dtype=torch.bool)
    assert info_nce(heads, image, text, everything_same).item() == pytest.approx(0.0, abs=1e-6)


def _latent_split(rng: np.random.Generator, n: int, maps: tuple[np.ndarray, np.ndarray]) -> Split:
    """Pairs whose image and text features are noisy linear views of one shared latent."""
    z = rng.standard_normal((n, maps[0].shape[0])).astype(np.float32)  # (N, 16)
    image = z @ maps[0] + 0.1 * rng.standard_normal((n, 1280)).astype(np.float32)
    text = z @ maps[1] + 0.1 * rng.standard_normal((n, 384)).astype(np.float32)
    return Split(torch.from_numpy(image), torch.from_numpy(text), np.eye(n, dtype=bool))


def test_fit_heads_generalises_to_unseen_pairs() -> None:
    """The trainer alone (no towers): held-out pairs of a shared-latent toy problem."""
    rng = np.random.default_rng(0)
    maps = (
        rng.standard_normal((16, 1280)).astype(np.float32) / 4,
        rng.standard_normal((16, 384)).astype(np.float32) / 4,
    )
    train, val, test = (_latent_split(rng, n, maps) for n in (256, 64, 128))
    config = EncoderTrainConfig(encoder=LiteEncoderConfig(dim=32), epochs=10, batch_size=64)
    heads, history = fit_heads(train, val, config, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    trained = retrieval_metrics(heads, test.image.numpy(), test.text.numpy(), test.matches)
    torch.manual_seed(0)
    untrained = retrieval_metrics(
        LiteHeads(config.encoder), test.image.numpy(), test.text.numpy(), test.matches
    )
    assert trained["chance_r1"] == pytest.approx(1 / 128)
    assert trained["t2i_r1"] >= 0.8
    assert trained["i2t_r1"] >= 0.8
    assert untrained["t2i_r1"] <= 0.1


@pytest.mark.pretrained
def test_training_writes_a_loadable_checkpoint_and_is_reproducible(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_encoder_pairs(tmp_path / "colours")
    out, cache = tmp_path / "run", tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="mmrag.encoders"):
        metrics = train_encoder([data], out, CONFIG, cache_dir=cache, progress=False)
    assert any("malformed JSON" in r.getMessage() for r in caplog.records)

    for name in ("config.json", "model.safetensors", "metrics.json", "RECIPE.md"):
        assert (out / name).is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert report["counts"]["pairs"] == 24
    assert report["counts"]["bad_lines"] == 1
    assert report["counts"]["no_text_or_image"] == 1
    # The seeded hash split (`group_side`) puts 3 of the 12 groups out, 1 in validation.
    assert report["counts"]["heldout"] == 6
    assert report["counts"]["validation"] == 2
    assert report["train_config"] == CONFIG.to_dict()
    assert set(report["metrics"]) == {"train", "validation", "heldout", "heldout_untrained"}
    assert metrics["heldout_chance_r1"] == pytest.approx(1 / 6)
    recipe = (out / "RECIPE.md").read_text()
    assert f"--out {out} --holdout {CONFIG.holdout} --group-key base --seed 0" in recipe

    encoder = LiteEncoder.from_pretrained(out)
    assert encoder.config == CONFIG.encoder
    assert encoder.fingerprint() == report["fingerprint"]
    assert encoder.encode_text(["a dark red square"]).shape == (1, 32)

    # Everything trains through the command line (features now come from the cache): the
    # 24 in-sample pairs must be retrieved far above chance (1/24)...
    everything = CONFIG.replace(holdout=0.0)
    config_file = tmp_path / "train.json"
    everything.save(config_file)
    argv = ["--data", str(data / "documents.jsonl"), "--cache-dir", str(cache), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="mmrag.encoders"):
        assert main([*argv, "--out", str(tmp_path / "all"), "--config", str(config_file)]) == 0
    assert any(
        "24 cached" in r.getMessage() and "0 to extract" in r.getMessage() for r in caplog.records
    )
    learned = json.loads((tmp_path / "all" / "metrics.json").read_text())["metrics"]["train"]
    assert learned["t2i_r1"] >= 0.5
    assert learned["i2t_r1"] >= 0.5
    # ...and the same seed and flags give byte-identical heads.
    flags = ["--holdout", "0", "--epochs", str(CONFIG.epochs), "--batch-size", "8", "--lr", "0.01"]
    assert (
        main([*argv, "--out", str(tmp_path / "again"), "--config", str(config_file), *flags]) == 0
    )
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("all", "again")]
    assert weights[0] == weights[1]


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--group-key" in capsys.readouterr().out


def test_missing_data_and_bad_config_fail_cleanly(tmp_path: Path) -> None:
    assert main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 3, "colour": "red"}', encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(bad)])


@pytest.mark.pretrained
def test_the_shipped_recipe_runs_on_a_tiny_budget(tmp_path: Path) -> None:
    """`checkpoints/lite-encoder/RECIPE.md`'s command (its train-config.json: the bridged
    encoder) on the colour squares for two epochs: a loadable bridged checkpoint whose
    recipe names the config file it wrote."""
    shipped = EncoderTrainConfig.load(checkpoint_dir("lite-encoder") / "train-config.json")
    config = shipped.replace(epochs=2, batch_size=8, bridge_prompts="{}")  # 1,000 texts, not 3,000
    config_file = tmp_path / "train.json"
    config.save(config_file)
    data = write_encoder_pairs(tmp_path / "colours")
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--config", str(config_file)]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    encoder = LiteEncoder.from_pretrained(out)
    assert encoder.config.bridged and encoder.dim == 384
    assert EncoderTrainConfig.load(out / "train-config.json") == config
    assert f"--config {out / 'train-config.json'}" in (out / "RECIPE.md").read_text()
    vectors = encoder.encode_text(["a light red square"])
    assert vectors.shape == (1, 384)
