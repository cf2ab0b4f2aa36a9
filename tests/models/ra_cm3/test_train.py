"""RA-CM3 trainer on a tiny synthetic set: data preparation, sequences, loss, resume, vanilla."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import HASHING, tiny_ra_cm3_config
from mmrag.config import ConfigError
from mmrag.models.ra_cm3.data import (
    Corpus,
    blank_patches,
    build_sequence,
    caption_span,
    heldout_variants,
)
from mmrag.models.ra_cm3.tokenizer import MultimodalTokenizer
from mmrag.models.ra_cm3.train import (
    STATE_FILE,
    Batcher,
    build_parser,
    config_from_args,
    main,
    prepare,
    ra_loss,
    train_ra_cm3,
)
from mmrag.models.vq.model import VQConfig
from mmrag.training.distributed import DistEnv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(shapes_dataset: Path) -> Path:
    return shapes_dataset


@pytest.fixture
def vq_dir(tiny_vq_dir: Path) -> Path:
    return tiny_vq_dir


tiny_config = tiny_ra_cm3_config


def test_heldout_variants_keep_siblings() -> None:
    groups = ["a", "a", "a", "b", "b", "c", None]
    held = heldout_variants(groups, fraction=1.0, seed=0)
    held_groups = [groups[i] for i in held]
    assert sorted(held_groups) == ["a", "b"]  # one per multi-member group, none from c / None
    for i in held:
        assert sum(1 for g in groups if g == groups[i]) - 1 >= 1  # a sibling stays


def test_heldout_variants_apart_from_another_split() -> None:
    groups = [g for g in "aabbccdd"] + [None]
    test = heldout_variants(groups, fraction=0.5, seed=0)
    assert np.array_equal(test, heldout_variants(groups, 0.5, 0, exclude=()))  # unchanged
    validation = heldout_variants(groups, fraction=0.5, seed=1, exclude=test.tolist())
    assert len(validation) == 2  # half of all four groups
    assert not {groups[i] for i in test} & {groups[i] for i in validation}  # disjoint groups
    with pytest.raises(ConfigError, match="left apart"):
        heldout_variants(groups, fraction=0.75, seed=1, exclude=test.tolist())


def test_prepare_validation_split(dataset: Path, vq_dir: Path, tmp_path: Path) -> None:
    config = tiny_config().replace(validation=0.25)
    prep = prepare([dataset], tmp_path / "run", config, vq_dir, HASHING, progress=False)
    held, validation = set(prep.heldout_rows.tolist()), set(prep.validation_rows.tolist())
    assert len(held) == 2 and len(validation) == 1 and not held & validation
    assert set(prep.train_rows) | held | validation == set(range(12))
    assert not (held | validation) & set(prep.train_rows.tolist())
    # the same test variants as without a validation split
    plain = prepare([dataset], tmp_path / "plain", tiny_config(), vq_dir, HASHING, False)
    assert held == set(plain.heldout_rows.tolist())
    assert prep.found is not None and prep.val_found is not None
    for pos in range(len(prep.train_rows)):
        assert not {int(j) for j in prep.found[pos].flatten()} & validation  # not in memory
    assert prep.val_found.shape[0] == 1  # the trainer's loss is on the validation variants
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["validation"] == sorted(validation) and len(split["validation_ids"]) == 1


def test_prepare_codes_splits_and_retrieves(dataset: Path, vq_dir: Path, tmp_path: Path) -> None:
    config = tiny_config()
    prep = prepare([dataset], tmp_path / "run", config, vq_dir, HASHING, progress=False)
    assert len(prep.corpus) == 12
    assert prep.corpus.codes.shape == (12, VQConfig.preset("tiny").tokens_per_image)
    assert len(prep.heldout_rows) == 2  # half of the 4 groups give up one variant
    assert set(prep.train_rows) | set(prep.heldout_rows) == set(range(12))
    assert len(prep.validation_rows) == 0  # no validation split unless asked
    assert prep.found is not None and prep.found.shape == (10, 2, 2)
    for pos, row in enumerate(prep.train_rows):
        found = {int(j) for j in prep.found[pos].flatten() if j >= 0}
        assert int(row) not in found  # self-exclusion
        assert not found & set(prep.heldout_rows.tolist())  # memory holds training docs only
    again = Corpus.load(tmp_path / "run" / "corpus.safetensors")
    assert torch.equal(again.codes, prep.corpus.codes) and again.ids == prep.corpus.ids


def test_sequences_modes_round_trip(dataset: Path, vq_dir: Path, tmp_path: Path) -> None:
    prep = prepare([dataset], tmp_path / "run", tiny_config(), vq_dir, HASHING, progress=False)
    tok, corpus = prep.tokenizer, prep.corpus
    rng = np.random.default_rng(0)
    plain = build_sequence(tok, corpus, 0, [1, 2], "plain", rng, prep.grid)
    main_doc, retrieved = tok.decode(plain.ids)
    assert main_doc == corpus.coded(0) and retrieved == [corpus.coded(1), corpus.coded(2)]
    assert any(plain.retrieved) and plain.main[-1] and not plain.main[0]
    uncond = build_sequence(tok, corpus, 0, [1], "uncond", rng, prep.grid)
    assert tok.decode(uncond.ids) == (corpus.coded(0, caption=False), [])
    for mode in ("caption", "spans"):
        for _ in range(5):
            ex = build_sequence(tok, corpus, 3, [4], mode, rng, prep.grid)
            assert any(t in tok.sentinel_ids for t in ex.ids)
            assert tok.decode(tok.causal_unmask(ex.ids))[0] == corpus.coded(3)
            assert len(ex.main) == len(ex.ids) == len(ex.retrieved)
    caption = build_sequence(tok, corpus, 3, [], "caption", rng, prep.grid)
    tail = caption.ids[caption.ids.index(tok.sentinel_ids[0], 3) + 1 : -1]
    assert tok.decode_text(tail) == corpus.captions[3]  # the caption is generated last
    a, b = caption_span(tok, tok.encode(corpus.coded(3)).ids)
    assert b > a


def test_batches_fill_the_token_budget(dataset: Path, vq_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tokens_per_step=600)
    prep = prepare([dataset], tmp_path / "run", config, vq_dir, HASHING, progress=False)
    batcher = Batcher(prep, config)
    cursor = 0
    for step in range(6):
        examples, nxt = batcher.batch(step, cursor)
        width = max(len(e.ids) for e in examples)
        assert len(examples) * width <= 600 or len(examples) == 1
        assert nxt == cursor + len(examples)
        again, _ = batcher.batch(step, cursor)
        assert [e.ids for e in again] == [e.ids for e in examples]  # pure function of step
        cursor = nxt


def test_ra_loss_weights_main_and_retrieved() -> None:
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    main = torch.tensor([[False, False, True, True]])
    retrieved = torch.tensor([[True, True, False, False]])
    loss, stats = ra_loss(nll, main, retrieved, alpha=0.1, env=DistEnv())
    assert loss.item() == pytest.approx(3.5 + 0.1 * 1.5)
    assert stats == {"main_tokens": 2.0, "retrieved_tokens": 2.0}
    only_main, _ = ra_loss(nll, main, torch.zeros_like(retrieved), 0.1, DistEnv())
    assert only_main.item() == pytest.approx(3.5)


def test_train_resumes_exactly_and_vanilla_sees_no_retrieval(
    dataset: Path, vq_dir: Path, tmp_path: Path
) -> None:
    config = tiny_config(image_positions=True)  # resolved from the tokenizer on every run
    full = train_ra_cm3([dataset], tmp_path / "full", config, vq_dir, HASHING, progress=False)
    assert np.isfinite(full["loss"]) and full["step"] == 4
    train_ra_cm3(
        [dataset], tmp_path / "cut", config.replace(steps=2), vq_dir, HASHING, progress=False
    )
    resumed = train_ra_cm3([dataset], tmp_path / "cut", config, vq_dir, HASHING, progress=False)
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-6)
    a = load_file(str(tmp_path / "full" / "generator" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "generator" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / STATE_FILE).is_file()
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [2.0, 4.0]
    assert metrics["history"][-1]["main_tokens"] > 0

    vanilla = train_ra_cm3(
        [dataset],
        tmp_path / "vanilla",
        config.replace(retrieval=False),
        vq_dir,
        HASHING,
        progress=False,
    )
    assert vanilla["retrieved_tokens"] == 0 and vanilla["step"] == 4
    assert not (tmp_path / "vanilla" / "memory").exists()
    ra_tokens = metrics["history"][-1]["tokens"]
    assert abs(vanilla["tokens"] - ra_tokens) <= 0.5 * ra_tokens  # same budget per step


def test_main_cli_trains_on_a_tiny_budget(dataset: Path, vq_dir: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    tiny_config(steps=2).save(config_file)
    rc = main(
        [
            "--data",
            str(dataset),
            "--out",
            str(tmp_path / "cli"),
            "--config",
            str(config_file),
            "--vq",
            str(vq_dir),
            "--encoder",
            "hashing",
            "--no-progress",
            "--image-positions",
            "on",
        ]
    )
    assert rc == 0
    assert (tmp_path / "cli" / "config.json").is_file()
    generator = json.loads((tmp_path / "cli" / "generator" / "config.json").read_text())
    tok = MultimodalTokenizer.from_pretrained(tmp_path / "cli" / "tokenizer")
    assert generator["image_grid"] ** 2 == tok.config.image_tokens
    assert (generator["image_first"], generator["image_count"]) == (
        tok.image_offset,
        tok.config.image_codes,
    )
    assert MultimodalTokenizer.from_pretrained(tmp_path / "cli" / "tokenizer").vocab_size <= 320


def test_flags_override_config_only_when_given(tmp_path: Path) -> None:
    vanilla = tmp_path / "vanilla.json"
    tiny_config(steps=2).replace(retrieval=False).save(vanilla)
    base = ["--data", "d", "--out", "o"]
    # Continuing a vanilla run from its train-config.json keeps it vanilla.
    kept = config_from_args(build_parser().parse_args([*base, "--config", str(vanilla)]))
    assert kept.retrieval is False and kept.steps == 2
    on = ["--config", str(vanilla), "--retrieval", "on", "--steps", "5"]
    turned = config_from_args(build_parser().parse_args([*base, *on]))
    assert turned.retrieval is True and turned.steps == 5
    assert config_from_args(build_parser().parse_args(base)).retrieval is True


def test_blank_patches_blanks_the_requested_share() -> None:
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    out = np.asarray(blank_patches(image, 0.25, np.random.default_rng(0)))
    assert (out == 255).all(axis=-1).mean() == pytest.approx(0.25)


@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_weights(
    dataset: Path, vq_dir: Path, tmp_path: Path
) -> None:
    """2 CPU processes (gloo) with the same global batches == one process, token for token:
    each rank takes a slice of the rows; the loss is normalised by global token counts."""
    import os
    import subprocess
    import sys

    config = tiny_config(steps=3, tokens_per_step=800, eval_every=3, save_every=3)
    config_file = tmp_path / "config.json"
    config.save(config_file)
    common = [
        "--data",
        str(dataset),
        "--config",
        str(config_file),
        "--vq",
        str(vq_dir),
        "--encoder",
        "hashing",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mmrag.models.ra_cm3.train",
        *common,
        "--out",
        str(tmp_path / "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = load_file(str(tmp_path / "single" / "generator" / "model.safetensors"))
    two = load_file(str(tmp_path / "ddp" / "generator" / "model.safetensors"))
    assert sorted(one) == sorted(two)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_state_from_before_a_new_field_still_resumes(tmp_path: Path) -> None:
    """Configs saved before `image_positions` (and the generator's image_* fields) existed
    read as their defaults; a real change is still refused."""
    from safetensors.torch import save_file

    from mmrag.config import ConfigError
    from mmrag.models.ra_cm3.train import _check_resumable

    config = tiny_config()
    old = config.to_dict()
    del old["image_positions"]
    for key in ("image_grid", "image_first", "image_count"):
        del old["generator"][key]
    path = tmp_path / STATE_FILE
    save_file({"x": torch.zeros(1)}, str(path), metadata={"config": json.dumps(old)})
    _check_resumable(path, config.replace(steps=config.steps + 10))  # steps may change
    with pytest.raises(ConfigError, match="image_positions"):
        _check_resumable(path, config.replace(image_positions=True))
