"""`mmrag eval vq` on a tiny random tokenizer and the shapes collection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmrag.eval.vq import evaluate_vqs, main, markdown, reconstruction_fid
from mmrag.vq import VQConfig, VQModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.pretrained  # the FID extractor is the packaged EfficientNet-Lite0
def test_reconstruction_fid_is_zero_for_a_perfect_copy_only(tiny_vq_dir: Path) -> None:
    model = VQModel.from_pretrained(tiny_vq_dir)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert reconstruction_fid(model, pixels) > 1.0  # a random tokenizer loses the picture

    class Identity(VQModel):
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def decode(self, codes: torch.Tensor) -> torch.Tensor:
            return codes

    assert reconstruction_fid(Identity(model.config), pixels) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.pretrained
def test_evaluate_and_main_score_each_tokenizer_on_the_held_out_groups(
    shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    other = tmp_path / "other"
    VQModel(VQConfig.preset("tiny")).save_pretrained(other)
    result = evaluate_vqs([tiny_vq_dir, other], [shapes_dataset], holdout=0.5, seed=0)
    assert result["heldout_images"] == 6  # two of the four colour groups, three shapes each
    rows = result["tokenizers"]
    assert set(rows) == {str(tiny_vq_dir), str(other)}
    for row in rows.values():
        assert row["reconstruction_fid"] > 0 and 0 < row["usage"] <= 1
    assert rows[str(tiny_vq_dir)] != rows[str(other)]
    assert "reconstruction FID" in markdown(result)

    out = tmp_path / "eval.json"
    argv = [str(tiny_vq_dir), "--data", str(shapes_dataset), "--holdout", "0.5"]
    assert main([*argv, "--limit", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["heldout_images"] == 3
    bigger = tmp_path / "bigger"
    VQModel(VQConfig.preset("tiny").replace(image_size=32)).save_pretrained(bigger)
    assert main([str(tiny_vq_dir), str(bigger), "--data", str(shapes_dataset)]) == 1
