"""Ray ingest on a local 2-CPU Ray instance: the memory it builds equals the single-process
ingest's (ids, vectors, metadata, report), a killed run resumes without re-encoding what was
committed, and it writes Milvus memories too."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import COLORS, HASHING, png_bytes
from mmrag.cli.main import main
from mmrag.data.readers import read_sources
from mmrag.memory import ray_ingest as ray_ingest_module
from mmrag.memory.ingest import IngestReport, ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.memory.ray_ingest import RayIngestConfig, id_snapshot, plan, ray_ingest

ray = pytest.importorskip("ray", reason="--ray needs the `scale` extra")

# Ray Data 2.60 warns about its own defaults when it first builds its DataContext (the
# constructor assigns deprecated options such as `use_push_based_shuffle` and `use_polars`);
# nothing of ours sets them. Only that module's DeprecationWarnings are ignored.
# When its node start-up retries ("Failed to get node info: Deadline Exceeded"), Ray can drop
# the handle of a helper process it started while the process still runs, and Python's
# Popen.__del__ warns when that handle is collected, at a moment pytest blames on whichever
# test is running (a clean-clone run failed this way once). Only that warning is ignored.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function Popen.__del__"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]
CONFIG = RayIngestConfig(workers=1, batch_size=4)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One small local instance for the module; ray_ingest joins it instead of starting one.
    Ray gives its raylet 30 s to register and once, in a clean-clone run right after another
    module's instance shut down, it did not: that start-up (not a test) is tried twice."""
    options = {
        "num_cpus": 2,
        "include_dashboard": False,
        "log_to_driver": False,
        "object_store_memory": 96 * 1024 * 1024,
    }
    try:
        ray.init(**options)
    except Exception as e:  # Ray raises a bare Exception for this
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(**options)
    yield
    ray.shutdown()


@pytest.fixture
def sources(tmp_path: Path) -> list[str]:
    """An image folder with captions, and a JSONL with text documents, a document repeated
    from the folder, a bad line and a corrupt image."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, (name, rgb) in enumerate(COLORS.items()):
        (folder / f"{name}.png").write_bytes(png_bytes(rgb, pattern=i))
        (folder / f"{name}.txt").write_text(f"a {name} square\n", encoding="utf-8")
        (folder / f"{name}.json").write_text(json.dumps({"color": name}), encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(png_bytes((1, 2, 3))[:40])
    lines = [json.dumps({"text": f"note {i}", "metadata": {"i": i}}) for i in range(9)]
    lines.insert(4, "{not json")
    lines.append(json.dumps({"image": "broken.png", "text": "a broken image"}))
    lines.append(json.dumps({"image": "pics/red.png", "text": "a red square"}))  # repeated
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [str(folder), str(tmp_path / "docs.jsonl")]


def contents(memory: Memory) -> dict[str, tuple[Any, list[float]]]:
    docs = [d for d in memory.get(list(memory.ids())) if d is not None]
    vectors = memory.vectors([d.seq for d in docs])
    return {d.id: (d.metadata, v.tolist()) for d, v in zip(docs, vectors, strict=True)}


def same_report(a: IngestReport, b: IngestReport) -> None:
    assert (a.read, a.added, a.existing, a.updated) == (b.read, b.added, b.existing, b.updated)

    def errors(report: IngestReport) -> list[tuple[str, str]]:  # Pillow names an address
        return sorted((e.source, re.sub(r" at 0x[0-9a-f]+", "", e.reason)) for e in report.errors)

    assert errors(a) == errors(b)


def test_plan_leaves_room_for_reading() -> None:
    assert plan(2.0, RayIngestConfig()) == (1, 1.5, 1)  # FINDINGS: 2 actors starved reading
    assert plan(2.0, RayIngestConfig(workers=2)) == (2, 0.75, 1)
    assert plan(16.0, RayIngestConfig(read_cpus=2.0)) == (14, 1.0, 1)
    assert plan(16.0, RayIngestConfig(workers=2)) == (2, 7.75, 7)


def test_id_snapshot_is_exact_membership() -> None:
    ids = [f"{i:032x}" for i in (5, 1, 2**100, 7)]
    snapshot = id_snapshot(ids)
    probe = ids + [f"{i:032x}" for i in (0, 6, 2**100 + 1, 2**127)]
    assert ray_ingest_module._stored(snapshot, probe).tolist() == [True] * 4 + [False] * 4
    assert not ray_ingest_module._stored(id_snapshot([]), ids[:2]).any()


def test_ray_ingest_equals_single_process(
    local_ray: None, sources: list[str], tmp_path: Path
) -> None:
    with ensure_memory(tmp_path / "one", HASHING) as memory:
        expected = ingest(memory, read_sources(sources), batch_size=4, progress=False)
        one = contents(memory)
    with ensure_memory(tmp_path / "ray", HASHING) as memory:
        report = ray_ingest(memory, sources, CONFIG, progress=False)
        got = contents(memory)
    assert expected.added == len(one) == len(COLORS) + 9
    assert len(expected.errors) == 2  # the bad line and the corrupt image
    same_report(report, expected)
    assert got.keys() == one.keys()
    for id_, (metadata, vector) in one.items():
        assert got[id_][0] == metadata
        np.testing.assert_allclose(got[id_][1], vector, rtol=1e-6)
    with Memory.open(tmp_path / "ray") as memory:
        assert len({sha for sha, _ in memory.blobs.iter_names()}) == len(COLORS)
    # Again with --update-metadata and one metadata edit: the first source holding a
    # document sets it (the JSONL's second copy of the red square changes nothing).
    lines = Path(sources[1]).read_text().splitlines()
    lines[0] = json.dumps({"text": "note 0", "metadata": {"i": 0, "edited": True}})
    Path(sources[1]).write_text("\n".join(lines) + "\n")
    reports = []
    for name in ("one", "ray"):
        with ensure_memory(tmp_path / name, HASHING) as memory:
            if name == "one":
                reports.append(ingest(memory, read_sources(sources), 4, False, True))
            else:
                reports.append(ray_ingest(memory, sources, CONFIG, False, True))
    same_report(reports[1], reports[0])
    assert reports[0].updated == 1 and reports[0].added == 0


def test_a_killed_ray_ingest_resumes_without_reencoding(
    local_ray: None, sources: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = ray_ingest_module._write
    calls = []

    def dies_after_one_batch(memory: Memory, rows: list[dict[str, Any]], *args: Any) -> int:
        calls.append(len(rows))
        if len(calls) > 1:
            raise KeyboardInterrupt  # as if the driver were killed between two commits
        return write(memory, rows, *args)

    monkeypatch.setattr(ray_ingest_module, "_write", dies_after_one_batch)
    path = tmp_path / "mem"
    with ensure_memory(path, HASHING) as memory, pytest.raises(KeyboardInterrupt):
        ray_ingest(memory, sources, CONFIG, progress=False)
    with Memory.open(path) as memory:
        committed = len(memory)
    assert 0 < committed < len(COLORS) + 9

    monkeypatch.setattr(ray_ingest_module, "_write", write)
    with ensure_memory(path, HASHING) as memory:
        report = ray_ingest(memory, sources, CONFIG, progress=False)
        assert len(memory) == len(COLORS) + 9
    assert report.added == len(COLORS) + 9 - committed  # only the rest was encoded
    assert report.existing == committed + 1  # + the document repeated across sources
    assert len(report.errors) == 2


def test_cli_ray_ingest_into_milvus(
    local_ray: None, sources: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pymilvus")
    mem = str(tmp_path / "mem")
    args = ["ingest", mem, *sources, "--encoder", "hashing", "--backend", "milvus", "--ray"]
    assert main([*args, "--batch-size", "4", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["added"], report["count"], len(report["errors"])) == (len(COLORS) + 9,) * 2 + (
        2,
    )
    with ensure_memory(tmp_path / "embedded", HASHING) as memory:
        ingest(memory, read_sources(sources), progress=False)
        expected = contents(memory)
    with Memory.open(mem) as memory:
        got = contents(memory)
    assert got.keys() == expected.keys()
    assert main(["ingest", mem, *sources, "--ray-address", "auto"]) == 1
    assert "--ray-address needs --ray" in capsys.readouterr().err
