"""FROMAGe's trainer on a tiny random LM: losses fall, resuming equals an uninterrupted run,
stage 2 refits the heads, the checkpoint loads and serves as a memory's encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmrag.models.fromage.language_model import tiny_language_model
from mmrag.models.fromage.model import FrozenLM, FrozenLMConfig
from mmrag.models.fromage.pairs import load_pair_data
from mmrag.models.fromage.train import (
    FromageTrainConfig,
    caption_token_count,
    plan_step,
    train_fromage,
)
from tiny_data import write_fromage_pairs

pytestmark = pytest.mark.pretrained  # EfficientNet-Lite0 features (packaged weights)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frozen image features, extracted once for the module."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fromage_pairs(tmp_path_factory.mktemp("pairs"))


def config(**changes: object) -> FromageTrainConfig:
    base = FromageTrainConfig(
        model=FrozenLMConfig(lm="tiny", prefix_tokens=2, retrieval_dim=16, img_tokens=2),
        holdout=0.2,
        steps=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        save_every=2,
        eval_every=2,
        head_epochs=3,
        head_batch=8,
    )
    return base.replace(**changes)


def tiny(cfg: FromageTrainConfig) -> FrozenLM:
    torch.manual_seed(cfg.seed)
    return FrozenLM(cfg.model, tiny_language_model())


def test_plan_is_a_function_of_the_step_and_never_pairs_an_item_with_itself(
    data_dir: Path, cache: Path
) -> None:
    cfg = config(interleave_prob=1.0)
    model = tiny(cfg)
    data = load_pair_data([data_dir], model, 0.2, "base", 0, cache, progress=False)
    assert (
        len(
            set(data.pairs.groups[i] for i in data.heldout)
            & {data.pairs.groups[i] for i in data.train}
        )
        == 0
    )
    a, b = plan_step(data, cfg, 3), plan_step(data, cfg, 3)
    assert np.array_equal(a.pairs, b.pairs) and a.query_partner == b.query_partner
    assert all(j != i for i, j in zip(a.pairs, a.caption_partner, strict=True))
    assert all(j != i for i, j in zip(a.pairs, a.query_partner, strict=True))
    assert caption_token_count(model, data, a) == sum(
        len(data.captions[int(i)]) + len(data.captions[int(j or 0)]) + 2
        for i, j in zip(a.pairs, a.caption_partner, strict=True)
    )


def test_resumed_training_equals_an_uninterrupted_run(
    data_dir: Path, cache: Path, tmp_path: Path
) -> None:
    straight = train_fromage(
        [data_dir], tmp_path / "a", config(), cache, progress=False, model=tiny(config())
    )
    train_fromage(
        [data_dir],
        tmp_path / "b",
        config(),
        cache,
        progress=False,
        model=tiny(config()),
        stop_after=2,
    )
    resumed = train_fromage(
        [data_dir], tmp_path / "b", config(), cache, progress=False, model=tiny(config())
    )
    assert [r["loss"] for r in resumed["history"]] == pytest.approx(
        [r["loss"] for r in straight["history"]], rel=1e-5
    )
    assert len(straight["head_history"]) == 3
    lm = tiny_language_model()
    a = FrozenLM.from_pretrained(tmp_path / "a", lm=lm)
    b = FrozenLM.from_pretrained(tmp_path / "b", lm=lm)
    for key, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[key], atol=1e-5), key
    with pytest.raises(ValueError, match="different configuration"):
        train_fromage(
            [data_dir], tmp_path / "b", config(lr=1.0), cache, progress=False, model=tiny(config())
        )


def test_training_lowers_the_losses(data_dir: Path, cache: Path, tmp_path: Path) -> None:
    cfg = config(steps=20, eval_every=0, save_every=20, head_epochs=0, lr=1e-2, holdout=0.0)
    metrics = train_fromage(
        [data_dir], tmp_path / "run", cfg, cache, progress=False, model=tiny(cfg)
    )
    first = np.mean([r["contrastive"] + r["ret"] for r in metrics["history"][:5]])
    last = np.mean([r["contrastive"] + r["ret"] for r in metrics["history"][-5:]])
    assert last < 0.8 * first
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_evaluate_fromage_scores_context_and_captions(
    data_dir: Path, cache: Path, tmp_path: Path
) -> None:
    from mmrag.models.fromage.evaluate import contextual_queries, evaluate_fromage, markdown

    cfg = config(steps=2, head_epochs=1, holdout=0.5)
    model = tiny(cfg)
    train_fromage([data_dir], tmp_path / "ckpt", cfg, cache, progress=False, model=model)
    result = evaluate_fromage(tmp_path / "ckpt", [data_dir], 2, cache, False, model=model)
    retrieval = result["retrieval"]
    for name in ("with_context", "caption_only"):
        scores = retrieval[name]
        assert 0 <= scores["r1"] <= scores["r5"] <= scores["r10"] <= 1
        assert scores["r1"] <= scores["family_r1"]  # the family includes the target
    assert result["captioning"]["n"] == result["heldout_pairs"]
    assert "R@1" in markdown(result)
    from mmrag.models.fromage.pairs import load_pair_data

    data = load_pair_data([data_dir], model, 0.5, "base", 0, cache, progress=False)
    queries = contextual_queries(data, data.heldout, 2, seed=0)
    for q in queries:
        group = data.pairs.groups[q.target]
        assert q.target not in q.context and len(q.context) == 2
        assert all(data.pairs.groups[s] == group for s in q.context)
