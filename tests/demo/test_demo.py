from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tiny_racm3
from mmrag.checkpoints import ENV_VAR
from mmrag.demo.report import run_demo
from mmrag.encoders.base import EncoderSpec


def test_demo_builds_memory_and_report_and_reuses_the_cache(tmp_path: Path) -> None:
    spec = EncoderSpec(name="hashing")
    report = run_demo(tmp_path, limit=40, progress=False, spec=spec, generation=False)
    html = report.read_text(encoding="utf-8")
    assert "Text → image" in html and "Image + text" in html and "data:image/png;base64," in html
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    first = results["info"]["ingest"]
    assert first["added"] == first["read"] > 40  # 40 emoji + the photos
    assert all(len(row["results"]) == 5 for row in results["sections"][0]["rows"])
    photo_rows = [
        r for r in results["sections"][1]["rows"] if "photo" not in r["query_caption"].lower()
    ]
    assert photo_rows  # the photographs are queried by image
    run_demo(tmp_path, limit=40, progress=False, spec=spec, generation=False)
    again = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["info"]["ingest"]
    assert again["added"] == 0 and again["existing"] == first["added"]


def test_demo_draws_and_captions_with_ra_cm3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RA-CM3 section with a tiny random model found through $MMRAG_CHECKPOINTS."""
    build_tiny_racm3().save_pretrained(tmp_path / "ckpt" / "ra-cm3")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "ckpt"))
    report = run_demo(tmp_path / "out", limit=40, progress=False, spec=EncoderSpec(name="hashing"))
    html = report.read_text(encoding="utf-8")
    assert "RA-CM3: caption → image" in html and "no retrieval" in html
    sections = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    drawn = next(s for s in sections["sections"] if s["title"] == "RA-CM3: caption → image")
    assert len(drawn["rows"]) == 4
    for row in drawn["rows"]:
        kinds = [r["id"] for r in row["results"]]
        assert kinds[:2] == ["generated", "generated"] and len(kinds) >= 3  # + evidence
