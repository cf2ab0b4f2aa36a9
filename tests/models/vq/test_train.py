"""VQ trainer on a tiny synthetic set: runs, holds out whole groups, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmrag.config import ConfigError
from mmrag.models.vq import train as vq_trainer
from mmrag.models.vq.data import load_images, split_holdout
from mmrag.models.vq.model import VQConfig, VQModel
from mmrag.models.vq.train import (
    STATE_FILE,
    BatchOrder,
    VQTrainConfig,
    build_parser,
    main,
    train_vq,
)
from mmrag.training.schedule import warmup_cosine
from tiny_data import write_vq_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_vq_images(tmp_path / "data")


def _config(steps: int) -> VQTrainConfig:
    return VQTrainConfig(
        vq=VQConfig.preset("tiny"),
        steps=steps,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        holdout=0.2,
        seed=3,
        eval_every=3,
        save_every=3,
        eval_images=8,
    )


def test_load_images_and_group_holdout(dataset: Path) -> None:
    images = load_images([dataset], 16, "base")
    assert images.pixels.shape == (10, 3, 16, 16)
    assert images.pixels.dtype == torch.uint8
    train, held = split_holdout(images.groups, 0.2, seed=3)
    assert len(held) == 2  # one of the five colour groups, both of its shapes
    assert {images.groups[i] for i in held}.isdisjoint({images.groups[i] for i in train})
    np.testing.assert_array_equal(held, split_holdout(images.groups, 0.2, seed=3)[1])
    # Documents without the group key always train.
    train, held = split_holdout([None, None, "a", "b"], 0.5, seed=0)
    assert {0, 1} <= set(train.tolist()) and len(held) == 1


def test_batch_order_is_a_function_of_the_step() -> None:
    order = BatchOrder(n=10, batch_size=4, seed=1)
    first_epoch = torch.cat([order.indices(0), order.indices(1), order.indices(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))  # every image once per epoch
    again = BatchOrder(n=10, batch_size=4, seed=1)
    assert torch.equal(again.indices(7), order.indices(7))
    assert torch.equal(again.flips(5), order.flips(5))


def test_lr_schedule_warms_up_then_decays() -> None:
    def lr_at(step: int, config: VQTrainConfig) -> float:
        return warmup_cosine(
            step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio
        )

    config = VQTrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(100, config) == pytest.approx(0.1)
    assert lr_at(50, config) < lr_at(20, config)


def test_train_runs_learns_and_writes_a_loadable_checkpoint(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    final = train_vq([dataset], out, _config(30), progress=False)
    assert final["step"] == 30
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["step"] for row in history] == [3.0 * i for i in range(1, 11)]
    assert history[-1]["mse"] < history[0]["mse"] * 0.7  # it learns
    assert np.isfinite(final["heldout_psnr"]) and 0 < final["heldout_usage"] <= 1
    model = VQModel.from_pretrained(out)
    assert load_file(str(out / "model.safetensors")).keys() == model.state_dict().keys()
    codes = model.encode_images([Image.open(dataset / "images/0-disc.png")])
    assert codes.shape == (1, 8, 8)


class KilledError(Exception):
    """Stands in for the process dying right after a checkpoint."""


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_vq([dataset], straight, _config(8), progress=False)

    real_save = vq_trainer.save_state

    def save_then_die(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        if args[3] == 6:  # the step
            raise KilledError

    monkeypatch.setattr(vq_trainer, "save_state", save_then_die)
    with pytest.raises(KilledError):
        train_vq([dataset], resumed, _config(8), progress=False)
    monkeypatch.undo()
    state_step = load_file(str(resumed / STATE_FILE))  # the state is complete on disk
    assert "rng.torch" in state_step
    final = train_vq([dataset], resumed, _config(8), progress=False)
    assert final["step"] == 8
    history = json.loads((resumed / "metrics.json").read_text())["history"]
    assert [row["step"] for row in history] == [3.0, 6.0, 8.0]
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    for key in a:  # same seed, same batches, same restarts: the very same weights
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # Rerunning a finished run trains no further; asking for more steps continues the count.
    assert train_vq([dataset], resumed, _config(8), progress=False)["step"] == 8
    assert train_vq([dataset], resumed, _config(10), progress=False)["step"] == 10


def test_resume_refuses_a_different_configuration(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_vq([dataset], out, _config(3), progress=False)
    assert (out / STATE_FILE).is_file()
    with pytest.raises(ConfigError, match="lr"):
        train_vq([dataset], out, _config(6).replace(lr=1e-4), progress=False)


def test_same_seed_same_weights(dataset: Path, tmp_path: Path) -> None:
    train_vq([dataset], tmp_path / "a", _config(4), progress=False)
    train_vq([dataset], tmp_path / "b", _config(4), progress=False)
    a = load_file(str(tmp_path / "a/model.safetensors"))
    b = load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_main_flags_and_help(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--out", "--preset", "--steps", "--perceptual-weight", "--seed"):
        assert flag in text
    out = tmp_path / "cli"
    argv = ["--data", str(dataset), "--out", str(out), "--preset", "tiny", "--steps", "2"]
    argv += ["--batch-size", "2", "--eval-every", "1", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    saved = VQTrainConfig.load(out / "train-config.json")
    assert saved.steps == 2 and saved.batch_size == 2 and saved.vq == VQConfig.preset("tiny")
    assert main(["--data", str(tmp_path / "missing"), "--out", str(out)]) == 1


def _refine_config(base: Path, steps: int) -> VQTrainConfig:
    return _config(steps).replace(
        init=str(base),
        decoder_only=True,
        pixel_loss="l1",
        adversarial_weight=0.1,
        adversarial_start=2,
        perceptual_weight=0.0,
    )


def test_decoder_only_refinement_keeps_every_code_and_trains_the_decoder(
    dataset: Path, tmp_path: Path
) -> None:
    base, refined = tmp_path / "base", tmp_path / "refined"
    train_vq([dataset], base, _config(6), progress=False)
    final = train_vq([dataset], refined, _refine_config(base, 6), progress=False)
    assert final["step"] == 6 and final["disc_loss"] > 0 and final["adaptive_weight"] >= 0
    before, after = VQModel.from_pretrained(base), VQModel.from_pretrained(refined)
    a, b = before.state_dict(), after.state_dict()
    frozen = [k for k in a if not k.startswith(("decoder.", "post_quant_conv."))]
    assert any(k.startswith("quantize.") for k in frozen)
    for key in frozen:  # encoder, quant_conv, codebook and its EMA statistics untouched
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["decoder.conv_out.weight"], b["decoder.conv_out.weight"])
    images = [Image.open(p) for p in sorted((dataset / "images").iterdir())]
    assert torch.equal(before.encode_images(images), after.encode_images(images))


def test_refinement_with_a_discriminator_resumes_exactly(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, straight, resumed = tmp_path / "base", tmp_path / "straight", tmp_path / "resumed"
    train_vq([dataset], base, _config(3), progress=False)
    train_vq([dataset], straight, _refine_config(base, 8), progress=False)
    real_save = vq_trainer.save_state

    def save_then_die(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        if args[3] == 6:
            raise KilledError

    monkeypatch.setattr(vq_trainer, "save_state", save_then_die)
    with pytest.raises(KilledError):
        train_vq([dataset], resumed, _refine_config(base, 8), progress=False)
    monkeypatch.undo()
    assert any(k.startswith("disc.") for k in load_file(str(resumed / STATE_FILE)))
    train_vq([dataset], resumed, _refine_config(base, 8), progress=False)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    for key in a:  # the discriminator and its optimizer came back too
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_refinement_configuration_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="init"):
        _config(2).replace(decoder_only=True)
    with pytest.raises(ConfigError, match="pixel_loss"):
        _config(2).replace(pixel_loss="huber")
    with pytest.raises(ConfigError, match="adversarial"):
        _config(2).replace(adversarial_weight=-1.0)
    other = tmp_path / "other"
    VQModel(VQConfig.preset("tiny").replace(codebook_size=32)).save_pretrained(other)
    with pytest.raises(ValueError, match="architecture"):
        train_vq([dataset], tmp_path / "run", _config(2).replace(init=str(other)), progress=False)


def test_main_refines_from_a_checkpoint_with_its_architecture(
    dataset: Path, tmp_path: Path
) -> None:
    base, out = tmp_path / "base", tmp_path / "refined"
    train_vq([dataset], base, _config(2), progress=False)
    argv = ["--data", str(dataset), "--out", str(out), "--init", str(base), "--decoder-only"]
    argv += ["--steps", "2", "--batch-size", "2", "--no-progress", "--threads", "1"]
    argv += ["--pixel-loss", "l1", "--adversarial-weight", "0.5"]
    assert main(argv) == 0
    saved = VQTrainConfig.load(out / "train-config.json")
    assert saved.vq == VQConfig.preset("tiny")  # from the checkpoint, not --preset's default
    assert saved.decoder_only and saved.init == str(base) and saved.adversarial_weight == 0.5
