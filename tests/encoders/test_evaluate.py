"""`mmrag eval encoder`: recall per source on its held-out groups, cross-style, bridge alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.config import EncoderTrainConfig, LiteEncoderConfig
from mmrag.encoders.evaluate import (
    bridge_alone,
    evaluate_encoders,
    load_source,
    main,
    parse_only,
)
from mmrag.encoders.lite import LiteEncoder
from mmrag.encoders.lite_train import train_encoder
from tiny_data import ENCODER_COLOURS, write_encoder_pairs

pytestmark = [pytest.mark.pretrained, pytest.mark.usefixtures("one_thread")]


def _style(folder: Path, name: str, size: int) -> Path:
    """One 'emoji style': each colour drawn as a disc of `size`, keyed like the emoji sets."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for colour, rgb in ENCODER_COLOURS.items():
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        image.paste(rgb, (32 - size, 32 - size, 32 + size, 32 + size))
        image.save(folder / "images" / f"{colour}.png")
        meta = {"emoji": colour, "base": colour, "dataset": name}
        parts = [{"image": f"images/{colour}.png"}, {"text": f"{colour} disc"}]
        lines.append(json.dumps({"parts": parts, "metadata": meta}))
    (folder / "documents.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_eval_scores_held_out_groups_per_source_and_across_styles(tmp_path: Path) -> None:
    colours = write_encoder_pairs(tmp_path / "colours")
    heads = tmp_path / "heads"
    config = EncoderTrainConfig(encoder=LiteEncoderConfig(dim=32), holdout=0.3, epochs=5)
    cache = tmp_path / "cache"
    train_encoder([colours], heads, config, cache_dir=cache, progress=False)
    styles = [_style(tmp_path / n, n, s) for n, s in (("small", 12), ("large", 28))]
    result = evaluate_encoders(
        [str(heads)], [colours, *styles], holdout=0.3, group_key="base", cache_dir=cache
    )
    metrics = json.loads((heads / "metrics.json").read_text())
    assert result["sources"]["colours"]["n"] == metrics["counts"]["heldout"]
    recall = result["recall"][str(heads)]
    assert set(recall) == {"colours", "small", "large"}
    assert recall["colours"] == pytest.approx(
        {k: v for k, v in metrics["metrics"]["heldout"].items() if k != "mean_recall"}
    )
    styles_scored = result["cross_style"][str(heads)]
    assert set(styles_scored) == {"small -> large", "large -> small"}
    assert styles_scored["small -> large"]["n"] == result["sources"]["small"]["n"]


def test_split_features_are_what_encode_image_gives(tmp_path: Path) -> None:
    colours = write_encoder_pairs(tmp_path / "colours")
    encoder = LiteEncoder.from_pretrained(None)
    source = load_source(colours, encoder, "base", "heldout", 0.3, 0, None, tmp_path / "cache")
    images = [source.pairs.images[i].open_image() for i in source.index]
    np.testing.assert_allclose(
        encoder.project_image(source.image), encoder.encode_image(images), atol=1e-6
    )
    np.testing.assert_allclose(
        encoder.project_text(source.text), encoder.encode_text(source.texts()), atol=1e-6
    )


def test_bridge_alone_zeroes_only_the_residuals() -> None:
    encoder = LiteEncoder.from_pretrained(None)
    if encoder.heads.bridge is None:
        pytest.skip("the shipped heads are not bridged")
    alone = bridge_alone(encoder)
    assert all(not w.any() for w in alone.heads.projections())
    assert any(w.detach().any() for w in encoder.heads.projections())  # the original is intact
    text = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    np.testing.assert_allclose(
        alone.project_text(text), text / np.linalg.norm(text, axis=1, keepdims=True), atol=1e-6
    )


def test_command_line_writes_json_and_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    colours = write_encoder_pairs(tmp_path / "colours")
    out = tmp_path / "eval.json"
    argv = ["--data", str(colours), "--holdout", "0.3", "--group-key", "base"]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "shipped" in result["recall"]
    assert "| shipped | colours |" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "absent"), "--out", str(out)]) == 1


def test_sources_can_be_narrowed_by_metadata_and_sampled_evenly(tmp_path: Path) -> None:
    colours = write_encoder_pairs(tmp_path / "colours")
    encoder = LiteEncoder.from_pretrained(None)
    cache = tmp_path / "cache"
    # No document has a "split" key: the source is not split, every pair is scored...
    whole = load_source(colours, encoder, "split", "heldout", 0.3, 0, None, cache)
    assert not whole.split and len(whole.index) == 24
    # ...narrowed to one group by its metadata, or sampled evenly across its (sorted) order.
    only = load_source(colours, encoder, "split", "heldout", 0.3, 0, None, cache, {"base": "g0"})
    assert sorted(only.texts()) == ["a dark cyan square", "a light red square"]
    sampled = load_source(colours, encoder, "split", "heldout", 0.3, 0, 3, cache)
    assert sampled.texts() == [whole.texts()[i] for i in (0, 12, 23)]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_only(["base"])
