"""Markdown tables from the benchmarks' result JSON (what benchmarks/README.md shows).

Run: .venv/bin/python benchmarks/report.py [--ingest FILE] [--search FILE]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from machine import RESULTS


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["params"].items() if k != "query_chunk") or "-"


def _run_line(result: dict[str, Any]) -> str:
    m, q = result["machine"], result["quiet"]
    v = m["versions"]
    return (
        f"{m['date']}, {m['cores']} x {m['cpu_model']}, numpy {v['numpy']}, "
        f"faiss-cpu {v['faiss-cpu']}, torch {v['torch']}, commit {str(m['git_commit'])[:7]}; "
        f"load {q['load_before']} -> {q['load_after']}, other processes used "
        f"{q['other_cpu_fraction']:.1%} of the CPU during the run (quiet: {q['quiet']})"
    )


def ingest_report(result: dict[str, Any]) -> str:
    c, r = result["config"], result["ratio"]
    sides = [
        [side, result[side]["docs_per_s"], result[side]["docs_per_s_median"],
         ", ".join(f"{s:.2f}" for s in result[side]["seconds"])]
        for side in ("model", "pipeline")
    ]  # fmt: skip
    out = [
        f"Run: {_run_line(result)}.",
        f"{c['n_docs']} documents ({c['images']} images), batch {c['batch_size']}, encoder "
        f"`{c['encoder']}` ({c['encoder_fingerprint'][:21]}), {c['repeats']} interleaved "
        "repeats of each side.",
        "",
        _table(["side", "docs/s (best)", "docs/s (median)", "seconds per run"], sides),
        "",
        f"Pipeline time / model time, median of the paired runs: "
        f"**{r['pipeline_time_over_model_time']:.3f}** (pairs: "
        f"{', '.join(f'{x:.3f}' for x in r['paired'])}), overhead **{r['overhead']:+.1%}**; "
        f"best-of overhead {r['best_of_overhead']:+.1%}, median-of-each "
        f"{r['median_of_each_overhead']:+.1%}. Goal < {r['goal_max_overhead']:.0%}: "
        f"**{'PASS' if r['pass'] else 'FAIL'}**.",
    ]
    if "stages" in result:
        st = result["stages"]
        out += [
            "",
            _table(
                ["stage (alone, sequential)", "seconds", "x model time"],
                [[k, v, st["fraction_of_model"][k]] for k, v in st["seconds"].items()],
            ),
        ]
    return "\n".join(out)


def _summary_rows(size: dict[str, Any]) -> list[dict[str, Any]]:
    rows = size["results"]
    picked = [r for r in rows if r["index"] in ("numpy", "flat")]
    defaults = {"hnsw": ("hnsw_ef_search", 128), "ivf": ("ivf_nprobe", 8)}
    for kind, (key, default) in defaults.items():
        picked += [r for r in rows if r["index"] == kind and r["params"][key] == default]
        best = size[f"{kind}_at_target"]
        if best is not None and best not in picked:
            picked.append(best)
    return picked


def _search_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["index"], _params(r), r["build_s"], f"{r['recall_at_10']:.3f}",
            r["single"]["p50_ms"], r["single"]["p99_ms"], r["single"]["qps"],
            r["batched"]["qps"], r["vs_numpy"]["single_p50_speedup"],
            r["vs_numpy"]["batched_qps_ratio"],
        ]
        for r in rows
    ]  # fmt: skip


SEARCH_HEADER = [
    "index", "params", "build s", "recall@10", "p50 ms (1 thr)", "p99 ms", "QPS single",
    "QPS batched (all cores)", "p50 speedup vs NumPy", "batched QPS / NumPy",
]  # fmt: skip


def search_report(result: dict[str, Any]) -> str:
    b = result["bounds"]
    out = [
        f"Run: {_run_line(result)}.",
        f"Read bandwidth (best NumPy kernel, {b['buffer_mib']} MiB buffer): "
        + ", ".join(
            f"{v} GB/s on {k.split('_')[2]} thread(s)"
            for k, v in b.items()
            if k.startswith("read_gbps_")
        )
        + f"; SGEMM GFLOP/s: {b['sgemm_gflops']}.",
    ]
    for size in result["sizes"]:
        out += [
            "",
            f"#### {size['n']:,} vectors, {size['dim']}-d ({size['data']['kind']})",
            "",
            f"Base: {size['data']['base']}. Queries: {size['data']['queries']}.",
            "",
            _table(SEARCH_HEADER, _search_rows(_summary_rows(size))),
        ]
        q = size["quiet"]
        out += [
            "",
            f"Other processes during this size: {q['other_cpu_fraction']:.1%} of the CPU "
            f"(load {q['load_before']} -> {q['load_after']}).",
        ]
        if "memory_layer" in size:
            mem = size["memory_layer"]
            header = [
                "Memory.search_vectors", "recall@10", "p50 ms", "p50 / own index", "added ms",
                "batched QPS", "batched QPS / own index", "p50 / bare FaissIndex row",
            ]  # fmt: skip
            rows = [
                [k, f"{m['recall_at_10']:.3f}", m["single"]["p50_ms"],
                 m["vs_own_index"]["single_p50_ratio"], m["vs_own_index"]["single_p50_added_ms"],
                 m["batched"]["qps"], m["vs_own_index"]["batched_qps_ratio"],
                 m["vs_bare_index"]["single_p50_ratio"]]
                for k, m in mem.items()
            ]  # fmt: skip
            out += ["", _table(header, rows)]
    out += ["", bandwidth_report(result), "", sweep_report(result)]
    return "\n".join(out)


def bandwidth_report(result: dict[str, Any]) -> str:
    rows = []
    for size in result["sizes"]:
        bb = size["bandwidth_bound"]
        for name in ("flat", "numpy"):
            x = bb[name]
            rows.append(
                [f"{size['n']:,}", name, bb["vector_mib"], bb["single_bound_ms"],
                 x["single_p50_over_bound"], bb["batch_bandwidth_bound_ms"],
                 x["batch_over_bandwidth_bound"], bb["batch_compute_bound_ms"],
                 x["batch_over_roofline_bound"], x["batch_gflops"]]
            )  # fmt: skip
    header = [
        "N", "exact", "MiB", "1-query bound ms", "p50 / bound", "batch bandwidth bound ms",
        "batch / bandwidth bound", "batch compute bound ms", "batch / roofline", "batch GFLOP/s",
    ]  # fmt: skip
    return _table(header, rows)


def sweep_report(result: dict[str, Any]) -> str:
    out = ["<details><summary>Full efSearch / nprobe sweeps</summary>", ""]
    for size in result["sizes"]:
        rows = [r for r in size["results"] if r["index"] in ("hnsw", "ivf")]
        out += [f"{size['n']:,} vectors", "", _table(SEARCH_HEADER, _search_rows(rows)), ""]
    out.append("</details>")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ingest", type=Path, default=RESULTS / "ingest.json", help="ingest JSON")
    p.add_argument("--search", type=Path, default=RESULTS / "search.json", help="search JSON")
    args = p.parse_args(argv)
    for path, render in ((args.ingest, ingest_report), (args.search, search_report)):
        if path.is_file():
            print(render(json.loads(path.read_text(encoding="utf-8"))))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
