"""The benchmarks cannot rot: their quick modes run in-process and write sane result JSON."""

from __future__ import annotations

import importlib
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mmrag.models.ra_cm3.model import RACM3Config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """The scripts, imported as modules (they import `machine` from their folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        yield {
            name: importlib.import_module(name)
            for name in ("bench_ingest", "bench_search", "bench_scale", "report")
        }


@pytest.fixture(scope="module")
def ingest_json(bench: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ingest")
    out = tmp / "ingest.json"
    assert bench["bench_ingest"].main(["--quick", "--out", str(out), "--work", str(tmp)]) == 0
    return out


@pytest.fixture(scope="module")
def search_json(bench: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("search")
    out = tmp / "search.json"
    assert bench["bench_search"].main(["--quick", "--out", str(out), "--work", str(tmp)]) == 0
    return out


def _machine_ok(result: dict[str, Any]) -> None:
    machine = result["machine"]
    assert machine["cores"] >= 1
    assert machine["cpu_model"]
    assert machine["versions"]["numpy"]
    assert machine["versions"]["faiss-cpu"]
    assert machine["date"].startswith("20")
    quiet = result["quiet"]
    assert len(quiet["load_before"]) == 3
    assert quiet["other_cpu_fraction"] >= 0.0


@pytest.mark.parametrize("name", ["bench_ingest", "bench_search", "bench_scale", "report"])
def test_help_explains_options(
    bench: dict[str, ModuleType], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench[name].main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--search" in out if name == "report" else "--quick" in out and "--out" in out


def test_ingest_quick(ingest_json: Path) -> None:
    result = json.loads(ingest_json.read_text())
    _machine_ok(result)
    config = result["config"]
    assert config["quick"] is True
    assert config["encoder"] == "hashing"
    n = config["n_docs"]
    assert n > config["batch_size"]  # several batches
    assert result["pipeline"]["added"] == n
    for side in ("model", "pipeline"):
        assert result[side]["docs_per_s"] > 0
        assert len(result[side]["seconds"]) == config["repeats"]
    ratio = result["ratio"]
    pairs = [
        p / m
        for p, m in zip(result["pipeline"]["seconds"], result["model"]["seconds"], strict=True)
    ]
    assert ratio["paired"] == pytest.approx(pairs, rel=1e-2)
    assert ratio["pipeline_time_over_model_time"] == pytest.approx(
        statistics.median(pairs), rel=1e-2
    )
    assert ratio["overhead"] == pytest.approx(ratio["pipeline_time_over_model_time"] - 1, abs=1e-3)
    assert ratio["pass"] == (ratio["overhead"] < ratio["goal_max_overhead"])
    stages = result["stages"]["seconds"]
    assert {"read_parse_hash", "decode", "blob_writes_fsync", "store_and_index"} <= set(stages)
    assert all(v >= 0 for v in stages.values())


def _row(size: dict[str, Any], index: str) -> list[dict[str, Any]]:
    return [r for r in size["results"] if r["index"] == index]


def test_search_quick(search_json: Path) -> None:
    result = json.loads(search_json.read_text())
    _machine_ok(result)
    bounds = result["bounds"]
    assert bounds["read_gbps_1_thread"] > 0
    assert all(v > 0 for v in bounds["sgemm_gflops"].values())
    sizes = result["sizes"]
    assert [s["data"]["kind"] for s in sizes] == ["real", "synthetic"]
    for size in sizes:
        assert size["dim"] == result["config"]["dim"]
        for row in size["results"]:
            assert 0.0 <= row["recall_at_10"] <= 1.0
            assert row["batched"]["qps"] > 0
            assert row["single"]["qps"] > 0
            assert 0 < row["single"]["p50_ms"] <= row["single"]["p99_ms"]
            assert row["vs_numpy"]["batched_qps_ratio"] > 0
        assert _row(size, "flat")[0]["recall_at_10"] == 1.0  # the reference itself
        assert _row(size, "numpy")[0]["recall_at_10"] >= 0.99  # exact too (up to ties)
        assert len(_row(size, "hnsw")) == len(result["config"]["ef_search"].split(","))
        assert len(_row(size, "ivf")) == len(result["config"]["nprobe"].split(","))
        assert size["bandwidth_bound"]["single_bound_ms"] > 0
    memory = sizes[0]["memory_layer"]
    assert memory["flat"]["recall_at_10"] >= 0.99
    assert memory["flat"]["vs_bare_index"]["single_p50_ratio"] > 0
    synthetic = sizes[1]
    assert synthetic["index_configs"]["ivf"]["trained"] is True  # big enough to train
    goals = result["goals"]
    assert isinstance(goals["exact_within_bandwidth_bound"]["pass"], bool)
    assert isinstance(goals["hnsw_speedup"]["pass_single"], bool)


def test_report_renders_both(
    bench: dict[str, ModuleType],
    ingest_json: Path,
    search_json: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--ingest", str(ingest_json), "--search", str(search_json)]
    assert bench["report"].main(argv) == 0
    out = capsys.readouterr().out
    assert "Pipeline time / model time" in out
    assert out.count("\n| numpy | - |") == 2  # one summary row per size
    assert "Memory.search_vectors" in out
    assert "<details>" in out


def test_generate_quick(tmp_path: Path) -> None:
    """The generation benchmark's quick mode: the cache beats recomputation, sane JSON."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        bench_generate = importlib.import_module("bench_generate")
        out = tmp_path / "generate.json"
        assert bench_generate.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    single = result["single_image"]
    assert len(single["cached_s"]) == len(single["recompute_s"]) == 2
    assert single["speedup_median_paired"] > 1.2  # 224 tokens: recomputation is quadratic
    assert {(r["batch"], r["guidance"]) for r in result["throughput"]} == {
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    }
    assert all(r["images_per_s"] > 0 for r in result["throughput"])
    assert result["config"]["model"] == "random tiny"
    cost = result["copy_cost"]
    assert len(cost["image_copy_s"]) == len(cost["caption_plain_s"]) == 2
    assert cost["image_copy_over_plain"] > 0 and cost["caption_copy_over_plain"] > 0
    assert isinstance(result["goals"]["pass_copy"], bool)
    assert result["config"]["copy_weight"] == RACM3Config().copy_weight  # no shipped config


# Ray Data 2.60 warns about its own deprecated defaults when it builds its DataContext.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_scale_quick(
    bench: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("pymilvus")
    tmp = tmp_path_factory.mktemp("scale")
    out = tmp / "scale.json"
    assert bench["bench_scale"].main(["--quick", "--out", str(out), "--work", str(tmp)]) == 0
    result = json.loads(out.read_text())
    _machine_ok(result)
    ingest = result["ingest"]
    assert ingest["same_documents"] is True  # Ray stored exactly what one process stored
    for side in ("single", "ray"):
        assert ingest[side]["docs_per_s"] > 0
    pairs = [
        s / r for s, r in zip(ingest["single"]["seconds"], ingest["ray"]["seconds"], strict=True)
    ]
    assert ingest["ratio"]["paired"] == pytest.approx(pairs, rel=1e-3)
    speedup = ingest["ratio"]["ray_speedup"]
    assert speedup == pytest.approx(statistics.median(ingest["ratio"]["paired"]), rel=1e-3)
    rows = result["search"]["results"]
    assert {(r["backend"], r["index"]) for r in rows} == {
        (b, i) for b in ("embedded", "milvus") for i in ("flat", "hnsw")
    }
    for row in rows:
        assert 0 < row["single"]["p50_ms"] <= row["single"]["p99_ms"]
        assert row["folder_bytes_per_doc"] > 0
        if row["index"] == "flat":  # both exact: the same top 10
            assert row["recall_at_10"] == pytest.approx(1.0, abs=0.01)
    for ratio in result["search"]["ratios"].values():
        assert ratio["milvus_over_faiss_p50"] > 0


def test_encoder_quick(tmp_path: Path) -> None:
    """The encoder benchmark's quick mode: every system timed, sane JSON."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        bench_encoder = importlib.import_module("bench_encoder")
        out = tmp_path / "encoder.json"
        assert bench_encoder.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert {"tower features", "plain heads", "shipped heads"} <= set(result["images_per_s"])
    assert all(len(s) == 2 for s in result["seconds"].values())
    assert result["heads_over_tower"] > 0
    assert isinstance(result["goals"]["pass_speed"], bool)


def test_retriever_quick(tmp_path: Path) -> None:
    """The retriever benchmark's quick mode: the bare index, the memory and the retriever
    timed on the same queries, the retriever's results as exact as flat search."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        bench_retriever = importlib.import_module("bench_retriever")
        out = tmp_path / "retriever.json"
        argv = ["--quick", "--out", str(out), "--work", str(tmp_path)]
        assert bench_retriever.main(argv) == 0
    result = json.loads(out.read_text())
    (size,) = result["sizes"]
    for kind in ("flat", "hnsw"):
        row = size["kinds"][kind]
        assert {"faiss", "memory", "retriever"} <= set(row)
        assert row["retriever"]["n"] == 60 and row["retriever_over_faiss_p50"] > 0
    assert size["kinds"]["flat"]["recall_at_10"] == 1.0
    assert size["kinds"]["hnsw"]["recall_at_10"] >= 0.9
    assert set(result["goals"]["retriever_over_faiss_p50"]) == {"2000/flat", "2000/hnsw"}


def test_ra_cm3_end_to_end(shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path) -> None:
    """The end-to-end RA-CM3 benchmark on a tiny trained run: both decodings timed per item."""
    from conftest import HASHING, tiny_ra_cm3_config
    from mmrag.models.ra_cm3.train import train_ra_cm3

    run = tmp_path / "ra"
    train_ra_cm3([shapes_dataset], run, tiny_ra_cm3_config(steps=2), tiny_vq_dir, HASHING)
    baseline = tmp_path / "baseline.json"
    RACM3Config(copy_weight=0.0).save(baseline)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        bench_ra_cm3 = importlib.import_module("bench_ra_cm3")
        out = tmp_path / "ra-cm3.json"
        argv = ["--run", str(run), "--model", str(run), "--baseline-config", str(baseline)]
        assert bench_ra_cm3.main([*argv, "--n", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for kind in ("image", "caption"):
        timing = result["seconds"][kind]
        assert len(timing["model"]) == len(timing["baseline"]) == 2
        assert all(t > 0 for t in timing["model"] + timing["baseline"])
        assert timing["model_over_baseline_median_paired"] > 0
    assert set(result["goals"]) >= {"pass_seconds", "pass_ratio"}
