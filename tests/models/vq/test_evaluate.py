"""`mmrag eval vq` on a tiny random tokenizer and the shapes collection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmrag.models.vq.evaluate import evaluate_vqs, main, markdown, scores
from mmrag.models.vq.model import VQConfig, VQModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.pretrained  # the FID extractor is the packaged EfficientNet-Lite0
def test_scores_give_a_perfect_copy_zero_fid_and_infinite_psnr_only(tiny_vq_dir: Path) -> None:
    model = VQModel.from_pretrained(tiny_vq_dir)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    lossy = scores(model, pixels, batch_size=3)  # two batches
    assert lossy["reconstruction_fid"] > 1.0  # a random tokenizer loses the picture
    assert 0 < lossy["usage"] <= 1 and lossy["psnr"] < 20

    class Identity(VQModel):
        """Code 0 everywhere, and the decoder draws the last images encoded."""

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            self.last = x
            return torch.zeros(len(x), 4, 4, dtype=torch.long)

        def decode(self, codes: torch.Tensor) -> torch.Tensor:
            return self.last

    perfect = scores(Identity(model.config), pixels, batch_size=3)
    assert perfect["reconstruction_fid"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["usage"] == pytest.approx(1 / model.config.codebook_size)
    assert perfect["psnr"] > 60


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
