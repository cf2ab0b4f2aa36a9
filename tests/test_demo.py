from __future__ import annotations

import json
from pathlib import Path

from mmrag.demo import run_demo
from mmrag.encoders.base import EncoderSpec


def test_demo_builds_memory_and_report_and_reuses_the_cache(tmp_path: Path) -> None:
    spec = EncoderSpec(name="hashing")
    report = run_demo(tmp_path, limit=40, progress=False, spec=spec)
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
    run_demo(tmp_path, limit=40, progress=False, spec=spec)
    again = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["info"]["ingest"]
    assert again["added"] == 0 and again["existing"] == first["added"]
