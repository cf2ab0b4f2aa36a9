"""`mmrag eval ra-cm3` end to end on two tiny runs (RA and vanilla) and a hashing memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HASHING, tiny_ra_cm3_config
from mmrag.checkpoints import checkpoint_dir
from mmrag.cli.main import main as cli_main
from mmrag.config import ConfigError
from mmrag.documents import load_image
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.data import CORPUS_FILE, Corpus
from mmrag.models.ra_cm3.evaluate import (
    Settings,
    caption_to_image,
    evaluate,
    image_to_caption,
    made_up_names,
    main,
    markdown,
    masked_tone,
    parse_decoding,
    pixel_rows,
    pixel_variant_accuracy,
    systems,
    top_agreement,
)
from mmrag.models.ra_cm3.model import CONFIG_FILE, RACM3, RACM3Config
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


SYSTEMS = {"ra-cm3", "generator alone", "ra-cm3 (no retrieval)", "vanilla", "copy 1"}


@pytest.mark.pretrained  # the FID extractor is the packaged EfficientNet-Lite0
@pytest.mark.slow
def test_evaluate_scores_every_system(
    runs: tuple[Path, Path], tiny_vq_dir: Path, tmp_path: Path
) -> None:
    ra, vanilla = runs
    settings = Settings(
        n=2,
        samples=1,
        caption_samples=2,
        guidance=2.0,
        knowledge=3,
        stored=2,
        icl=2,
        ways=2,
        style=1,
        progress=False,
    )
    result = evaluate(ra, vanilla, None, settings)
    systems = result["systems"]
    assert set(systems) == SYSTEMS | {"retrieval only"}
    for metrics in systems.values():
        assert metrics["fid"] >= 0 and math.isfinite(metrics["fid"])
        assert -1 <= metrics["dual_encoder_score"] <= 1
        assert metrics["cider"] >= 0 and 0 <= metrics["exact"] <= 1
        assert 0 <= metrics["variant_accuracy"] <= 1
        assert 0 <= metrics["variant_accuracy_pixels"] <= 1
    assert 0 <= result["truth_variant_accuracy"] <= 1 and result["true_codes_fid"] >= 0
    knowledge = result["knowledge"]
    assert knowledge["chance"] == pytest.approx(1 / 3)
    core = ("ra-cm3", "generator alone", "ra-cm3 (no retrieval)", "vanilla")
    assert all(0 <= knowledge[k] <= 1 for k in core)
    # each knowledge image is stored twice (its training caption and the made-up name)
    assert knowledge["captioned_as_stored"] == 1.0
    stored = result["stored"]
    assert set(stored) == set(core)
    # what the memory holds is written and drawn exactly, even by a model of four steps
    assert stored["ra-cm3"]["exact"] == 1.0 and stored["ra-cm3"]["drawn_exactly"] == 1.0
    assert all(0 <= m["drawn_cells"] <= 1 for m in stored.values())
    assert "EfficientNet-Lite0" in markdown(result) and "stored documents" in markdown(result)
    assert 0 <= result["truth_top_agreement"] <= 1 and "top retrieved" in markdown(result)
    # copy weight 1 draws the top retrieved image's codes
    assert systems["copy 1"]["top_agreement"] == 1.0
    assert "top_agreement" not in systems["retrieval only"]
    assert result["heldout_documents"] == 2
    assert result["infill"] == {} and result["style"] == {}  # no skin tones among shapes
    icl = result["icl"]
    assert icl["chance"] == 0.5 and icl["episodes"] == 2
    assert all(0 <= icl[k] <= 1 for k in ("pinned", "no demonstrations", "retrieval"))
    assert "in-context classification" in markdown(result)

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
            "--decoding",
            "copy_weight=1,copy_sources=2",
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
    assert {"ra-cm3 + copy 0", "ra-cm3 + copy 1"} <= set(written["systems"])
    assert "ra-cm3 copy_weight=1.0, copy_sources=2" in written["systems"]
    assert (written["split"], written["heldout_documents"]) == ("validation", 2)
    # weight 1 draws the top retrieved image's codes, the share the eval reports
    assert written["systems"]["ra-cm3 + copy 1"]["top_agreement"] == 1.0
    assert written["models"]["vq"] == str(tiny_vq_dir)
    chosen = written["settings"]
    assert (chosen["n"], chosen["samples"], chosen["caption_samples"]) == (2, 1, 1)
    assert (chosen["guidance"], chosen["seed"], chosen["progress"]) == (None, 0, False)
    assert chosen["copy_weights"] == [0.0, 1.0] and chosen["split"] == "validation"
    assert written["decoding"]["guidance"] == 3.0  # the model's own


@pytest.mark.slow
def test_the_evaluation_generates_what_the_command_line_generates(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The eval's systems call the public generate_* with the shipped settings: the same items
    through `mmrag generate` give the same outputs."""
    ra, _ = runs
    # the shipped decoding (pixels pasted, colour analogies, verified captions) on this run
    own = RACM3Config.load(ra / CONFIG_FILE)
    shipped = RACM3Config.load(checkpoint_dir("ra-cm3") / CONFIG_FILE)
    keep = {k: getattr(own, k) for k in ("same_document_slot", "trained_with_retrieval")}
    shipped.replace(**keep).save(ra / CONFIG_FILE)
    split = json.loads((ra / "split.json").read_text())
    corpus = Corpus.load(ra / CORPUS_FILE)
    rows = split["heldout"][:2]
    settings = Settings(progress=False)
    with Memory.open(ra / "memory") as memory:
        model = RACM3.from_pretrained(ra, memory)
        system = systems(model, model, settings)[0]
        assert system.name == "ra-cm3"
        captions = [corpus.captions[i] for i in rows]
        images = [load_image(corpus.image_paths[i]) for i in rows]
        drawn = caption_to_image(system, captions, settings, "")
        written = image_to_caption(system, images, settings, "")
    for i, row in enumerate(rows):
        seed = str(settings.seed + i)
        common = [str(ra / "memory"), "--model", str(ra), "--seed", seed, "--json"]
        out = ra.parent / f"{i}.png"
        image_args = ["--caption", captions[i], "--out", str(out)]
        assert cli_main(["generate", "image", *common, *image_args]) == 0
        assert cli_main(["generate", "caption", *common, "--image", corpus.image_paths[row]]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        as_drawn, as_written = json.loads(lines[-2]), json.loads(lines[-1])
        assert as_written["output"] == written[i]
        assert as_drawn["scores"] == [round(s, 6) for s in drawn[i].scores]
        assert np.array_equal(np.asarray(load_image(out)), np.asarray(drawn[i].image))


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


def test_masked_tone_masks_the_skin_tone_only() -> None:
    assert masked_tone("man surfing: dark skin tone") == "man surfing: <mask> skin tone"
    assert masked_tone("man: medium-dark skin tone, red hair") == (
        "man: <mask> skin tone, red hair"
    )
    assert masked_tone("red apple") is None


def test_parse_decoding_types_the_settings_and_rejects_unknown_keys() -> None:
    assert parse_decoding("copy_weight=1,copy_sources=4,same_document_slot=true") == (
        ("copy_weight", 1.0),
        ("copy_sources", 4),
        ("same_document_slot", True),
    )
    for bad in ("nope=1", "copy_weight", "copy_sources=many", "retriever=x"):
        with pytest.raises(ConfigError, match="--decoding"):
            parse_decoding(bad)


def test_pixel_variant_accuracy_asks_which_family_image_is_nearest() -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    family = pixel_rows([Image.new("RGB", (40, 40), c) for c in colours])
    families = [(family, 0), (family, 2)]  # the first asks for red, the second for blue
    reddish, green = Image.new("RGB", (64, 64), (180, 50, 40)), Image.new("RGB", (8, 8), colours[1])
    assert pixel_variant_accuracy([reddish, green], families) == 0.5  # a sibling is no hit
    assert pixel_variant_accuracy([reddish, Image.new("RGB", (9, 9), colours[2])], families) == 1.0
