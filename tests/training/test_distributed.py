"""Data-parallel training: 2 CPU processes under torchrun train the same weights as one process
given the same global batches (the encoder heads' InfoNCE and the VQ codebook included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmrag.config import EncoderTrainConfig, LiteEncoderConfig
from mmrag.encoders import lite_train as encoder_trainer
from mmrag.encoders import pairs as encoder_pairs
from mmrag.encoders.lite import LiteHeads
from mmrag.encoders.lite_train import info_nce, sharded_info_nce
from mmrag.models.vq import train as vq_trainer
from mmrag.models.vq.model import VQConfig
from mmrag.training.distributed import DistEnv, gather_rows, shard
from tiny_data import write_encoder_pairs as write_pairs
from tiny_data import write_fromage_pairs
from tiny_data import write_vq_images as write_images

TIMEOUT_S = 300


pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(module: str, *args: str) -> None:
    """`torchrun --standalone --nproc-per-node 2 -m MODULE ARGS` on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def vq_one_and_two(
    config: vq_trainer.VQTrainConfig, data: Path, out: Path, one: bool = True
) -> tuple[Path, Path]:
    """Train `config` in one process (out/one, unless `one` is False) and under torchrun with
    two (out/two); the two model.safetensors paths."""
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")
    argv = ["--data", str(data), "--config", str(out / "config.json"), "--no-progress"]
    if one:
        assert vq_trainer.main([*argv, "--out", str(out / "one")]) == 0
    torchrun("mmrag.models.vq.train", *argv, "--out", str(out / "two"))
    return out / "one" / "model.safetensors", out / "two" / "model.safetensors"


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert sorted(left) == sorted(right)
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-4, atol=atol, msg=name)


def test_shards_cover_a_batch_in_order() -> None:
    for n in (0, 1, 5, 8):
        slices = [shard(n, DistEnv(rank=r, world_size=3)) for r in range(3)]
        covered = [i for s in slices for i in range(n)[s]]
        assert covered == list(range(n))
        assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1


def test_sharded_info_nce_is_info_nce_in_one_process() -> None:
    torch.manual_seed(0)
    heads = LiteHeads(LiteEncoderConfig(dim=16))
    image, text = torch.randn(6, 1280), torch.randn(6, 384)
    same = torch.eye(6, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True  # a false negative pair
    env = DistEnv()
    assert gather_rows(image, env) is image
    shared = sharded_info_nce(
        heads.project_image(image),
        heads.project_text(text),
        heads.logit_scale.exp(),
        same,
        slice(0, 6),
        env,
    )
    torch.testing.assert_close(shared, info_nce(heads, image, text, same))


@pytest.mark.pretrained  # the feature cache is keyed by the packaged weights' SHA-256
def test_encoder_heads_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "colours")
    cache = tmp_path / "cache"
    # batch 7 of 24 pairs: shards of 4 and 3, and a last batch of 3 (2 + 1)
    config = EncoderTrainConfig(
        encoder=LiteEncoderConfig(dim=16), holdout=0.0, epochs=4, batch_size=7, lr=1e-2
    )
    pairs = encoder_pairs.load_pairs([data], config.group_key)
    rng = np.random.default_rng(0)  # stand-ins for the frozen towers' features
    rows = {i: (rng.standard_normal(1280), rng.standard_normal(384)) for i in pairs.ids}
    encoder_pairs._write_cache(encoder_pairs.feature_cache_path(cache, config.encoder), rows)
    config.save(tmp_path / "config.json")
    argv = [
        "--data",
        str(data),
        "--cache-dir",
        str(cache),
        "--config",
        str(tmp_path / "config.json"),
    ]

    assert encoder_trainer.main([*argv, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    torchrun("mmrag.encoders.lite_train", *argv, "--out", str(tmp_path / "two"), "--no-progress")

    one_weights, two_weights = (tmp_path / d / "model.safetensors" for d in ("one", "two"))
    assert_same_weights(one_weights, two_weights, atol=1e-6)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    np.testing.assert_allclose(
        [r["loss"] for r in one["history"]], [r["loss"] for r in two["history"]], rtol=1e-5
    )
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]  # it did train


def test_vq_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data")
    # batch 5 (shards of 3 and 2); a dead-code threshold this high restarts codes at every
    # step, so the restart candidates must be gathered from both ranks in batch order.
    config = vq_trainer.VQTrainConfig(
        vq=VQConfig.preset("tiny").replace(dead_code_threshold=0.5),
        steps=4,
        batch_size=5,
        lr=3e-3,
        warmup_steps=1,
        holdout=0.2,
        seed=3,
        eval_every=2,
        save_every=2,
        eval_images=4,
    )
    one_weights, two_weights = vq_one_and_two(config, data, tmp_path)
    # Float sums in another order differ in the last bits; Adam turns the noise on weights
    # whose true gradient is zero (attention key biases) into steps of up to ~lr/100.
    assert_same_weights(one_weights, two_weights, atol=1e-4)
    counts = [load_file(str(w))["quantize.ema_count"] for w in (one_weights, two_weights)]
    assert torch.equal(*counts)  # integer counts, summed over ranks: exactly the same
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-4, atol=1e-6)


@pytest.mark.pretrained  # EfficientNet-Lite0 features
@pytest.mark.slow
def test_fromage_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """FROMAGe's adapters on a tiny random Llama: 2 ranks on slices of the same global batches
    train the same adapters as one process (stage 1), and refit the same heads (stage 2)."""
    from mmrag.models.fromage import train as fromage_trainer
    from mmrag.models.fromage.model import FrozenLMConfig

    data = write_fromage_pairs(tmp_path / "pairs")
    config = fromage_trainer.FromageTrainConfig(
        model=FrozenLMConfig(lm="tiny", prefix_tokens=2, retrieval_dim=16, img_tokens=2),
        holdout=0.2,
        steps=3,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        save_every=3,
        eval_every=3,
        head_epochs=2,
        head_batch=8,
    )
    config.save(tmp_path / "config.json")
    argv = ["--data", str(data), "--config", str(tmp_path / "config.json"), "--no-progress"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--threads", "1"]

    assert fromage_trainer.main([*argv, "--out", str(tmp_path / "one")]) == 0
    torchrun("mmrag.models.fromage.train", *argv, "--out", str(tmp_path / "two"))

    one, two = (tmp_path / d / "adapters.safetensors" for d in ("one", "two"))
    assert_same_weights(one, two, atol=1e-5)


def test_vq_decoder_refinement_under_torchrun(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data")
    base = vq_trainer.VQTrainConfig(
        vq=VQConfig.preset("tiny"), steps=2, batch_size=4, lr=3e-3, warmup_steps=1, holdout=0.2
    )
    vq_trainer.train_vq([data], tmp_path / "base", base, progress=False)
    refine = base.replace(
        init=str(tmp_path / "base"), decoder_only=True, pixel_loss="l1", steps=3, eval_every=3
    )
    # Without the adversarial term the two ranks' refinement is the one-process refinement.
    one_weights, two_weights = vq_one_and_two(refine, data, tmp_path / "plain")
    assert_same_weights(one_weights, two_weights, atol=1e-4)
    frozen = load_file(str(tmp_path / "base" / "model.safetensors"))
    refined = load_file(str(two_weights))
    assert torch.equal(frozen["quantize.codebook"], refined["quantize.codebook"])

    # With it, each rank weighs the term by its own shard: it runs and trains the decoder.
    adversarial = refine.replace(adversarial_weight=0.1)
    _, gan = vq_one_and_two(adversarial, data, tmp_path / "gan", one=False)
    history = json.loads((gan.parent / "metrics.json").read_text())["history"]
    assert history[-1]["disc_loss"] > 0 and np.isfinite(history[-1]["l1"])
