"""`mmrag eval ra-cm3` end to end on two tiny runs (RA and vanilla) and a hashing memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import HASHING, tiny_ra_cm3_config
from mmrag.config import ConfigError
from mmrag.models.ra_cm3.evaluate import (
    Settings,
    evaluate,
    made_up_names,
    main,
    markdown,
    top_agreement,
)
from mmrag.models.ra_cm3.train import train_ra_cm3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def runs(shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    config = tiny_ra_cm3_config(steps=2, validation=0.5)
    ra, vanilla = tmp_path / "ra", tmp_path / "vanilla"
    train_ra_cm3([shapes_dataset], ra, config, tiny_vq_dir, HASHING, progress=False)
    train_ra_cm3(
        [shapes_dataset],
        vanilla,
        config.replace(retrieval=False),
        tiny_vq_dir,
        HASHING,
        progress=False,
    )
    return ra, vanilla


def test_made_up_names_are_distinct_and_seeded() -> None:
    names = made_up_names(30, seed=0)
    assert len(set(names)) == 30 and names == made_up_names(30, seed=0)
    assert names != made_up_names(30, seed=1)


@pytest.mark.pretrained  # the FID extractor is the packaged EfficientNet-Lite0
@pytest.mark.slow
def test_evaluate_scores_every_system(
    runs: tuple[Path, Path], tiny_vq_dir: Path, tmp_path: Path
) -> None:
    ra, vanilla = runs
    settings = Settings(
        n=2, samples=1, caption_samples=2, guidance=2.0, knowledge=3, stored=2, progress=False
    )
    result = evaluate(ra, vanilla, None, settings)
    systems = result["systems"]
    copied = "ra-cm3 + copy 0.5"  # the default copy weight
    assert set(systems) == {"ra-cm3", copied, "ra-cm3 (no retrieval)", "vanilla", "retrieval only"}
    assert systems[copied]["cider"] == systems["ra-cm3"]["cider"]  # image codes only
    for metrics in systems.values():
        assert metrics["fid"] >= 0 and math.isfinite(metrics["fid"])
        assert -1 <= metrics["dual_encoder_score"] <= 1
        assert metrics["cider"] >= 0
    knowledge = result["knowledge"]
    assert knowledge["chance"] == pytest.approx(1 / 3)
    assert all(
        0 <= knowledge[k] <= 1 for k in ("ra-cm3", copied, "ra-cm3 (no retrieval)", "vanilla")
    )
    stored = result["stored"]
    assert set(stored) == {"ra-cm3", "ra-cm3 (no retrieval)", "vanilla"}
    assert all(m["cider"] >= 0 and 0 <= m["exact"] <= 1 for m in stored.values())
    assert "EfficientNet-Lite0" in markdown(result) and "stored document" in markdown(result)
    assert 0 <= result["truth_top_agreement"] <= 1 and "top retrieved" in markdown(result)
    for name in ("ra-cm3", copied, "ra-cm3 (no retrieval)", "vanilla"):
        assert 0 <= systems[name]["top_agreement"] <= 1
    assert "top_agreement" not in systems["retrieval only"]
    # The retrieval-only baseline returns a stored training image; the held-out one is absent.
    assert result["heldout_documents"] == 2

    out = tmp_path / "eval.json"
    rc = main(
        [
            "--ra",
            str(ra),
            "--vanilla",
            str(vanilla),
            "--n",
            "2",
            "--samples",
            "1",
            "--caption-samples",
            "1",
            "--knowledge",
            "0",
            "--stored",
            "0",
            "--copy-weight",
            "0",
            "1",
            "--split",
            "validation",
            "--out",
            str(out),
            "--no-progress",
            "--vq",
            str(tiny_vq_dir),  # the runs' own VQ: the same codes, so it is accepted
        ]
    )
    written = json.loads(out.read_text())
    assert rc == 0 and written["knowledge"] == {} and written["stored"] == {}  # both skipped
    assert "ra-cm3 + copy 1" in written["systems"]  # a system per non-zero weight
    assert not any(name.startswith("ra-cm3 + copy 0") for name in written["systems"])
    assert (written["split"], written["heldout_documents"]) == ("validation", 2)
    # weight 1 draws the top retrieved image's codes, the share the eval reports
    assert written["systems"]["ra-cm3 + copy 1"]["top_agreement"] == 1.0
    assert written["models"]["vq"] == str(tiny_vq_dir)
    chosen = written["settings"]
    assert (chosen["n"], chosen["samples"], chosen["caption_samples"]) == (2, 1, 1)
    assert (chosen["guidance"], chosen["seed"], chosen["progress"]) == (3.0, 0, False)
    assert chosen["copy_weights"] == [0.0, 1.0] and chosen["split"] == "validation"


def test_top_agreement_is_the_share_of_cells_copied() -> None:
    assert top_agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 0, 0], None]) == 0.5
    assert top_agreement([[1, 2], [3, 4]], [[1, 2], [0, 4]]) == 0.75
    assert top_agreement([[1, 2]], [None]) is None


def test_settings_and_splits_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="copy weights"):
        Settings(copy_weights=(0.5, 1.5))
    with pytest.raises(ConfigError, match="split"):
        Settings(split="train")
    ra, vanilla = tmp_path / "ra", tmp_path / "vanilla"
    for run, validation in ((ra, [3]), (vanilla, [4])):
        run.mkdir()
        split = {"train": [0, 1], "heldout": [2], "validation": validation}
        (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(ConfigError, match="different validation sets"):
        evaluate(ra, vanilla, None, Settings(split="validation"))
    (ra / "split.json").write_text(json.dumps({"train": [0, 1], "heldout": [2]}))
    with pytest.raises(ConfigError, match="--validation"):
        evaluate(ra, vanilla, None, Settings(split="validation"))
