"""Which JSON files and fields each generated table of docs/results.md and README.md shows.

Rendered by ``results_doc.py`` (``python benchmarks/results_doc.py [--check]``). A table is a
function of a ``Results`` (the files it reads are listed under it with their machines); labels
are names, never numbers: every number comes from a file.
"""

from __future__ import annotations

from collections.abc import Callable

from encoder_tasks_summary import TASKS, merge_results
from results_doc import KS, Cell, Results, grid, joined, num, passkey, ppl, recall, speed, table, text

# the files of the main SmolLM2-135M runs (4 x 1024 test tokens unless the name says a length)
FREE = "compare_smollm2_training_free.json"            # dense, oracle, oracle_head, window_sinks, quest (wiki)
BBC = "compare_smollm2_bbc_k64.json"                   # dense, window_sinks@64, SEA K=128 @64 (BBC)
BBC_ORACLE = "compare_smollm2_bbc_oracle_sea.json"     # oracle@64/128, SEA K=128 @64/128 (BBC)
BBC_WINDOW = "compare_smollm2_bbc_window_sinks_k32_128.json"
K128 = {"wiki": "compare_smollm2_sea_undistilled.json", "bbc": BBC_ORACLE}
K256 = {t: (f"compare_smollm2_sea_K256_k64_{t}.json", f"compare_smollm2_sea_K256_k32_128_{t}.json")
        for t in ("wiki", "bbc")}
K512 = {t: f"compare_smollm2_sea_K512_k64_{t}.json" for t in ("wiki", "bbc")}
ROWS120 = {t: f"compare_smollm2_sea_rows128x4_120x1024_{t}.json" for t in ("wiki", "bbc")}
EST256 = {t: f"compare_smollm2_sea_K256_rows128x4_300x1024_{t}.json" for t in ("wiki", "bbc")}
EST512 = {t: f"compare_smollm2_sea_K512_rows128x4_500x1024_{t}.json" for t in ("wiki", "bbc")}
DIAG = {"undistilled, K=256": "diagnose_smollm2_undistilled_K256_{}.json",
        "K=256, 300 steps": "diagnose_smollm2_K256_rows128x4_300x1024_{}.json",
        "K=512, 500 steps": "diagnose_smollm2_K512_rows128x4_500x1024_{}.json"}
NOT_MEASURED = text("not measured")
DEFAULT_ATTENTION = "attention_long_rows_c16.json"  # the long-rows default (and the per-query rows before it), idle
MODEL_COST_TINY, MODEL_COST_SMOLLM2 = "model_cost_tiny.json", "model_cost_smollm2.json"  # DynamicCache, before
MODEL_COST_GROWING = ("model_cost_tiny_growing.json", "model_cost_tiny_dynamic.json", "model_cost_tiny_growing_block.json",
                      "model_cost_smollm2_growing.json", "model_cost_smollm2_growing_block.json")
DECODE_STEP = "decode_step.json"  # `sea bench decode`: one layer's ms per token
RETRIEVAL_CANDIDATES = [("dense (not SEA)", "retrieval_needle_smollm2_undistilled_1k.json"),
                        ("dense (not SEA)", "retrieval_kernel_dense_needle2k.json"),
                        ("dense (not SEA)", "retrieval_kernel_dense_copy1k.json"),
                        ("candidates=1 (default)", "retrieval_kernel_default_k64.json"),
                        ("candidates=4", "retrieval_candidates4_k64.json"),
                        ("candidates=8", "retrieval_candidates8_k64.json"),
                        ("candidates=1 (default)", "retrieval_needle4k_candidates1.json"),  # and its dense row
                        ("candidates=4", "retrieval_needle4k_candidates4.json")]


def compare_row(results: Results, label: str, names: str | tuple[str, ...], method: str) -> list[str]:
    """method | k | perplexity | x dense | keys/query/head | coverage over k = 32 / 64 / 128 (files merged)."""
    points = results.points(names, method)
    ks = [None] if None in points else [k for k in KS if k in points]
    field = lambda key, digits: joined(num(points[k][key], digits) for k in ks)  # noqa: E731
    return [label, joined(str(k) for k in ks) if ks != [None] else "-", field("perplexity", 2), field("ratio", 3),
            field("keys_per_query", 1), field("coverage", 3) if points[ks[0]]["coverage"] is not None else "-"]


def compare_table(rows: list[tuple[str, str, str]]) -> Callable[[Results], str]:
    header = ["method", "k", "perplexity", "x dense", "keys/query/head", "coverage"]
    return lambda results: table(header, [compare_row(results, *row) for row in rows])


def bench_table(names: list[str], methods: list[str]) -> Callable[[Results], str]:
    """`sea bench attention`: per file and length, seconds (peak MB) of each method."""
    def render(results: Results) -> str:
        rows = []
        for name in names:
            result = results.load(name)
            for length in sorted({p["length"] for p in result["points"]}):
                rows.append([str(result["setup"]["estimate_width"]), f"{length:,}"]
                            + [speed(name, m, length)(results) for m in methods])
        return table(["K", "T"] + methods, rows)
    return render


def breakdown_table(name: str) -> Callable[[Results], str]:
    """`sea bench attention --breakdown`: each stage's seconds and time / FLOP floor, per length."""
    def render(results: Results) -> str:
        recorded = results.load(name)["breakdown"]
        rows = []
        for point in recorded["lengths"]:
            cells = [f"{s['seconds']:.3f}" + (f" ({s['seconds'] / s['floor_seconds']:.1f}x)" if s["floor_seconds"] else "")
                     for s in point["stages"]]
            rows.append([point["grouping"], f"{point['length']:,}", f"{point['total_seconds']:.3f}", *cells])
        stages = [s["stage"] for s in recorded["lengths"][0]["stages"]]
        return table(["grouping", "T", "forward s"] + [f"{s} s (x floor)" for s in stages], rows) + \
            f"\n\nFloors at the recorded matmul rate, {recorded['matmul_gflops']:.0f} GFLOP/s."
    return render


def attention_ab_table(name: str) -> Callable[[Results], str]:
    """``attention_ab.py``: one layer's prefill, two source trees in one process (best of the turns), and SDPA."""
    def render(results: Results) -> str:
        rows = []
        for run in results.load(name)["runs"]:
            setup = run["setup"]
            for p in run["points"]:
                old, new, sdpa = (min(p[f"{key}_seconds"]) for key in ("old", "new", "sdpa"))
                rows.append([f"{setup['heads']} / {setup['kv_heads']}", f"{p['length']:,}", str(setup["repeats"]),
                             f"{old:.3f}", f"{new:.3f}", f"{new / old:.2f}", f"{sdpa:.3f}", f"{sdpa / new:.2f}",
                             "bitwise" if p["max_abs_diff"] == 0 else f"{p['max_abs_diff']:.1e}"])
        return table(["heads / kv heads", "T", "turns", "before s", "after s", "after / before", "SDPA s",
                      "SEA speed x SDPA", "outputs"], rows)
    return render


def edge_dots_ways(results: Results) -> str:
    """``edge_dots_ways.py``: milliseconds per span call and nanoseconds per dot of each way, by row width."""
    points = results.load("edge_dots_ways.json")["points"]
    return table(["way", "row width", "dots per call", "ms per call", "ns per dot"],
                 [[p["way"], str(p["features"]), f"{p['dots']:,}", f"{p['ms']:.2f}", f"{p['ns_per_dot']:.1f}"]
                  for p in points])


def model_bench(results: Results) -> str:
    """`sea bench model`: prefill and decode tokens/s, dense vs SEA, per grouping."""
    rows = []
    for grouping, name in (("query", "model_smollm2.json"), ("block", "model_smollm2_block.json")):
        for p in results.load(name)["points"]:
            rows.append([p["mode"] if p["mode"] == "dense" else f"sea ({grouping})", f"{p['length']:,}",
                         num(p["prefill_tok_s"], 1), num(p["decode_tok_s"], 2)])
    return table(["attention", "prompt tokens", "prefill tokens/s", "decode tokens/s"], rows)


def model_cost_table(names: tuple[str, ...]) -> Callable[[Results], str]:
    """`sea bench model`: prefill and decode tokens/s, dense vs SEA, and SEA / dense, with the KV cache
    both modes used (files written before ``--cache`` existed ran transformers' DynamicCache)."""
    def render(results: Results) -> str:
        rows = []
        for name in names:
            result = results.load(name)
            by = {(p["mode"], p["length"]): p for p in result["points"]}
            cache = result["setup"].get("cache", "dynamic")
            options = {"grouping": "query", **result.get("sea_options", {})}
            grouping = ", ".join([options.pop("grouping")] + [f"{k}={v}" for k, v in options.items()])
            for length in sorted({p["length"] for p in result["points"]}):
                dense, sea = by["dense", length], by["sea", length]
                peaks = [num(p["prefill_peak_mb"], 0) if p.get("prefill_peak_mb") is not None else "not measured"
                         for p in (dense, sea)]
                rows.append([result["setup"]["model"], cache, grouping, f"{length:,}", num(dense["prefill_tok_s"], 0),
                             num(sea["prefill_tok_s"], 0), num(sea["prefill_tok_s"] / dense["prefill_tok_s"]),
                             num(dense["decode_tok_s"], 1), num(sea["decode_tok_s"], 1),
                             num(sea["decode_tok_s"] / dense["decode_tok_s"]), *peaks])
        return table(["model", "KV cache", "SEA grouping (options)", "prompt tokens", "prefill dense tok/s", "prefill SEA tok/s", "SEA / dense",
                      "decode dense tok/s", "decode SEA tok/s", "SEA / dense", "prefill peak MB dense",
                      "prefill peak MB SEA"], rows)
    return render


def decode_step_table(name: str, methods: tuple[str, ...]) -> Callable[[Results], str]:
    """`sea bench decode`: one layer's ms per decoded token per method and prompt length, and SDPA / each."""
    def render(results: Results) -> str:
        points = results.load(name)["points"]
        present = [m for m in methods if any(p["method"] == m for p in points)]
        by = {(p["method"], p["length"]): p for p in points}
        rows = []
        for length in sorted({p["length"] for p in points}):
            cells = [num(by[m, length]["seconds"] * 1e3, 2) if by.get((m, length), {}).get("seconds") else "-"
                     for m in present]
            speedups = [num(by[m, length]["speedup_vs_sdpa"]) if by.get((m, length), {}).get("speedup_vs_sdpa")
                        else "-" for m in present if m != "sdpa"]
            rows.append([f"{length:,}"] + cells + speedups)
        return table(["prompt tokens"] + [f"{m} ms/token" for m in present]
                     + [f"SDPA / {m}" for m in present if m != "sdpa"], rows)
    return render


def retrieval_rows(result: dict) -> list[dict]:
    """THE rows of a retrieval run's file: ``sea compare`` writes ``points``, the older scripts ``rows``."""
    return result.get("rows") or result["points"]


def retrieval_candidates(results: Results) -> str:
    """The suite's needle and copy rows of the undistilled patch, with and without exact refinement."""
    rows = []
    for label, name in RETRIEVAL_CANDIDATES:
        result = results.load(name)
        for r in retrieval_rows(result):
            cell = num(r["accuracy"]) if r["task"] == "copy" else answered(r)
            rows.append(["dense (not SEA)" if r["method"] == "dense" else label, r["task"], f"{r['length']:,}", cell])
    return table(["method (SmolLM2-135M, undistilled patch, k=64)", "task", "prompt tokens",
                  "correct / prompts (copy: exact-token accuracy)"], rows)


NEEDLE_4K = [  # (what selects, file, method): the same 5 needle prompts at 4,096 tokens, k=64 unless named
    ("dense attention (every key)", "retrieval_oracle_needle4k.json", "dense"),
    ("oracle: the exact top keys of the query, budget shared by its heads", "retrieval_oracle_needle4k.json", "oracle"),
    ("oracle_head: the exact top 64 keys of each head", "retrieval_oracle_needle4k.json", "oracle_head"),
    ("SEA, `sea.patch` defaults (undistilled)", "retrieval_needle4k_candidates1.json", "sea"),
    ("SEA, candidates=4 (exact refinement)", "retrieval_needle4k_candidates4.json", "sea"),
    ("SEA, `grouping=\"block\"` (undistilled)", "retrieval_needle4k_block.json", "sea"),
    ("SEA, block grouping and `dense_until=2048` (undistilled)", "retrieval_needle4k_block_du2048.json", "sea"),
    ("SEA's bins and budget, each bin scored by the mean-key logit alone", "retrieval_suspects_needle_4k_b.json",
     "cells_meankey"),
    ("SEA's bins and budget, each bin scored by its exact attention mass", "retrieval_suspects_needle_4k.json",
     "cells_mass"),
    ("the same, scored by the largest exact probability inside", "retrieval_suspects_needle_4k.json", "cells_max"),
    ("the same exact mass, a budget per head", "retrieval_suspects_needle_4k.json", "cells_mass_head"),
    ("the same exact mass, K=512 (8 keys per bin)", "retrieval_suspects_needle_4k_K512.json", "cells_mass@K512"),
    ("the same exact mass, K=1024 (4 keys per bin)", "retrieval_suspects_needle_4k_K1024.json", "cells_mass@K1024"),
    ("the same exact mass, k=128", "retrieval_suspects_needle_4k_k128.json", "cells_mass"),
]


def needle_4k(results: Results) -> str:
    """Which selections find the needle at 4k: dense, the oracles, SEA and SEA's bins with exact scores."""
    rows = []
    for label, name, method in NEEDLE_4K:
        result = results.load(name)
        row = next(r for r in retrieval_rows(result) if r["method"] == method)
        rows.append([label, str(row["k"] or "-"), answered(row)])
    return table(["selection (SmolLM2-135M, needle in wiki/BBC test prose, 4,096 tokens)", "k", "correct / prompts"],
                 rows)


def refine_perplexity(results: Results) -> str:
    """Wiki validation perplexity of the undistilled patch at k=64, without and with exact refinement."""
    rows = []
    for label, name in (("candidates=1 (default)", "retrieval_kernel_default_k64.json"),
                        ("candidates=4", "ppl_candidates4_k64.json"), ("candidates=8", "ppl_candidates8_k64.json")):
        result = results.load(name)["perplexity"]
        by = {r["name"]: r["perplexity"] for r in result["rows"]}
        rows.append([label, f"{result['tokens']:,}", num(by["dense"]), num(by["sea"]), num(by["sea"] / by["dense"], 3)])
    return table(["SEA@64, undistilled patch", "wiki validation tokens", "dense", "SEA", "x dense"], rows)


def ppl_ratio(value: float, dense: float) -> str:
    """A perplexity beside its ratio to dense: '20.98 (x1.038)'."""
    return f"{num(value)} (x{num(value / dense, 3)})"


def answered(row: dict) -> str:
    """A retrieval row's cell: the prompts it answered of those it ran, e.g. "3/10"."""
    return f"{row['correct']}/{row['prompts']}"


def ppl_cells(dense: dict, sea: dict) -> list[str]:
    """The tokens, dense, SEA and x dense cells of one ``sea eval`` SEA row beside its run's dense row."""
    return [f"{sea['tokens']:,}", num(dense["perplexity"]), num(sea["perplexity"]),
            num(sea["perplexity"] / dense["perplexity"], 3)]


def dense_until_perplexity(results: Results) -> str:
    """Wiki validation perplexity of the undistilled patch at k=64 on 4,096-token windows, by ``dense_until``."""
    rows = []
    for until in (0, 2048):
        result = results.load(f"eval_dense_until_{until}_4k.json")
        by = {r["name"]: r for r in result["rows"]}
        label = "0 (off: every row runs SEA)" if not until else f"{until:,} (rows with at most {until:,} keys: dense)"
        rows.append([label, f"{result['seq_len']:,}", *ppl_cells(by["dense"], by["sea"])])
    return table(["dense_until (SEA@64, undistilled)", "window", "tokens", "dense", "SEA", "x dense"], rows)


SMOLLM2_LAYERS = 30
DENSE_LAYERS = (("none (every layer runs SEA)", "none", ()), ("0-2 (the first three)", "0_2", (0, 1, 2)),
                ("3-10", "3_10", tuple(range(3, 11))), ("3-6", "3_6", (3, 4, 5, 6)), ("7-10", "7_10", (7, 8, 9, 10)),
                ("27-29 (the last three)", "27_29", (27, 28, 29)),
                ("none (every layer runs SEA)", "none_test", ()), ("3-10", "3_10_test", tuple(range(3, 11))))


def dense_layers_perplexity(results: Results) -> str:
    """Wiki perplexity of the undistilled patch at k=64 on 4,096-token windows, by ``dense_layers``, with
    the keys a query reads per head averaged over SmolLM2's 30 layers (a dense row reads all its keys)."""
    rows = []
    for label, tag, layers in DENSE_LAYERS:
        result = results.load(f"eval_dense_layers_{tag}_4k.json")
        assert tuple(result["sea_config"]["dense_layers"]) == layers, (tag, result["sea_config"]["dense_layers"])
        by = {r["name"]: r for r in result["rows"]}
        mean_keys = (len(layers) * (result["seq_len"] + 1) / 2
                     + (SMOLLM2_LAYERS - len(layers)) * by["sea"]["k"]) / SMOLLM2_LAYERS
        rows.append([label, result["split"], f"{mean_keys:,.0f}", *ppl_cells(by["dense"], by["sea"])])
    return table([f"dense layers (SEA@64, undistilled SmolLM2, {SMOLLM2_LAYERS} layers)", "wiki split",
                  "keys per query and head (mean)", "tokens", "dense", "SEA", "x dense"], rows)


def dense_layers_coverage(results: Results) -> str:
    """Layers 0-12 of the undistilled patch at k=64 on wiki validation: the dense attention mass SEA's and the
    oracle's keys cover at 1k and 4k, and the spread of SEA's per-head coverage at 4k."""
    short, long = (results.load(f"diagnose_validation_default_{n}.json")["layers"] for n in ("1k", "4k"))
    rows = []
    for a, b in zip(short[:13], long[:13]):
        heads = b["head_coverage"]["sea"]
        rows.append([str(b["layer"]), num(a["coverage"]["sea"]), num(a["coverage"]["oracle"]), num(b["coverage"]["sea"]),
                     num(b["coverage"]["oracle"]), f"{min(heads):.2f}-{max(heads):.2f}"])
    return table(["layer", "SEA 1k", "oracle 1k", "SEA 4k", "oracle 4k", "SEA 4k, per head (min-max)"], rows)


def candidates_4k(results: Results) -> str:
    """Wiki validation perplexity of the undistilled patch at k=64 on 4,096-token windows: the default
    against exact refinement among 4x the candidates (the same k keys per query and head)."""
    rows = []
    for label, name in (("candidates=1 (default)", "eval_dense_layers_none_4k.json"),
                        ("candidates=4", "eval_candidates4_4k.json")):
        by = {r["name"]: r for r in results.load(name)["rows"]}
        rows.append([label, *ppl_cells(by["dense"], by["sea"])])
    return table(["SEA@64, undistilled SmolLM2, 4,096-token windows", "wiki validation tokens", "dense", "SEA",
                  "x dense"], rows)


BLOCK_REFINED = (  # grouping, candidates, k, then the sea eval files at 1,024 / 4,096 / 8,192-token windows
    ("query (default)", 1, 64, ("retrieval_kernel_default_k64.json", "eval_dense_layers_none_4k.json",
                                "eval_forced_before_validation_8192.json")),
    ("query", 4, 64, ("ppl_candidates4_k64.json", "eval_candidates4_4k.json", None)),
    ("block", 1, 32, ("eval_block_1k_k32_64.json", "eval_block_4k.json", None)),
    ("block", 4, 32, ("eval_block_cand4_1k_k32_64.json", "eval_block_cand4_4k_k32.json", "eval_block_cand4_8k_k32.json")),
    ("block", 1, 64, ("eval_block_1k_k32_64.json", "eval_block_4k.json", None)),
    ("block", 2, 64, (None, "eval_block_cand2_4k.json", "eval_block_cand2_8k.json")),
    ("block", 4, 64, ("eval_block_cand4_1k_k32_64.json", "eval_block_cand4_4k.json", "eval_block_cand4_8k.json")),
    ("block, query_block=16", 4, 64, (None, "eval_block_qb16_cand4_4k.json", None)),
)


def _eval_ppl(results: Results, name: str, method: str = "dense", k: int | None = None) -> float:
    """One row's perplexity in a ``sea eval`` file (or a retrieval file's ``perplexity`` part): ``method``
    at budget ``k`` (every-key methods: None)."""
    result = results.load(name)
    rows = result["perplexity"]["rows"] if "perplexity" in result else result["rows"]
    return next(r for r in rows if r["name"] == method and (k is None or r["k"] == k))["perplexity"]


def _ratio_at(results: Results, name: str | None, k: int) -> str:
    """SEA@k's perplexity over its run's dense one in a ``sea eval`` file (``_eval_ppl``), with its ratio
    (``ppl_ratio``)."""
    if name is None:
        return "not run"
    return ppl_ratio(_eval_ppl(results, name, "sea", k), _eval_ppl(results, name))


def block_refined_perplexity(results: Results) -> str:
    """Wiki validation perplexity of the undistilled patch by grouping, candidates and k, at three window lengths."""
    rows = [[label, str(c), str(k), *(_ratio_at(results, name, k) for name in names)]
            for label, c, k, names in BLOCK_REFINED]
    return table(["grouping", "candidates", "k", "1,024-token windows", "4,096", "8,192"], rows)


SHORT_ROWS = (  # label, k, window, the sea eval file with ceil(n / c) in every row, then with the budget's share
    ("undistilled, query, candidates=4", 64, "1,024", "ppl_candidates4_k64.json", "eval_query_cand4_1k_share.json"),
    ("undistilled, block, candidates=4", 32, "1,024", "eval_block_cand4_1k_k32_64.json", "eval_block_cand4_1k_share.json"),
    ("undistilled, block, candidates=4", 64, "1,024", "eval_block_cand4_1k_k32_64.json", "eval_block_cand4_1k_share.json"),
    ("undistilled, block, candidates=4", 64, "4,096", "eval_block_cand4_4k.json", "eval_block_cand4_4k_share.json"),
    ("undistilled, block, candidates=4", 32, "8,192", "eval_block_cand4_8k_k32.json", "eval_block_cand4_8k_k32_share.json"),
    ("undistilled, block, candidates=4", 64, "8,192", "eval_block_cand4_8k.json", "eval_block_cand4_8k_share.json"),
    ("demo model, block, candidates=4", 32, "1,024", "eval_demo_block_cand4_1k_before.json",
     "eval_demo_block_cand4_1k_share.json"),
    ("demo model, block, candidates=4", 64, "1,024", "eval_demo_block_cand4_1k_before.json",
     "eval_demo_block_cand4_1k_share.json"),
    ("demo model, query (default)", 32, "1,024", "eval_demo_query_1k.json", None),
    ("demo model, query (default)", 64, "1,024", "eval_demo_query_1k.json", None),
)


def refine_short_rows(results: Results) -> str:
    """Wiki validation perplexity with refinement before and after short rows kept their budget's share."""
    rows = [[label, str(k), window, _ratio_at(results, before, k),
             _ratio_at(results, after, k) if after else "unchanged (no refinement)"]
            for label, k, window, before, after in SHORT_ROWS]
    return table(["SmolLM2-135M, wiki validation", "k", "window", "ceil(n / c) in every row",
                  "the budget's share in short rows"], rows)


def refine_short_rows_retrieval(results: Results) -> str:
    """The suite's needle and copy (test haystacks) for per-query refinement, before and after the short-row share."""
    rows = []
    for label, names in (("ceil(n / c) in every row", ("retrieval_candidates4_k64.json",)),
                         ("the budget's share in short rows", ("retrieval_candidates4_k64_share.json",
                                                               "retrieval_candidates4_copy_share.json"))):
        found = {(r["task"], r["length"]): r for name in names for r in results.load(name)["rows"]}
        rows.append([label, *(answered(found['needle', n]) for n in (1024, 2048)),
                     *(num(found["copy", n]["accuracy"], 2) for n in (1024, 2048))])
    return table(["undistilled SmolLM2, candidates=4, k=64", "needle at 1,024", "needle at 2,048",
                  "copy (tokens) at 1,024", "copy at 2,048"], rows)


LONG_ROWS_POLICY = (  # label, then the sea eval files at 1,024 / 2,048 / 4,096 / 8,192-token windows (str: a note)
    ("query on every row (block_from=0, the default until 2026-12-06)",
     ("retrieval_kernel_default_k64.json", "eval_long_rows_val_2k_per_query.json", "eval_dense_layers_none_4k.json",
      "eval_forced_before_validation_8192.json")),
    ("block_from=1024, block_candidates=4", ("= query", "eval_long_rows_val_2k_from1024.json",
                                       "eval_long_rows_val_4k_from1024.json", "eval_long_rows_val_8k_from1024.json")),
    ("block_from=1024, block_candidates=8", ("= query", None, "eval_long_rows_val_4k_from1024_c8.json", None)),
    ("block_from=2048, block_candidates=4", ("= query", "= query", "eval_long_rows_val_4k_from2048.json",
                         "eval_long_rows_val_8k_from2048.json")),
    ("block, candidates=4 on every row", ("eval_block_cand4_1k_share.json", None, "eval_block_cand4_4k_share.json",
                                          "eval_block_cand4_8k_share.json")),
    ("block_from=1024, block_candidates=16 (the default from 2026-12-06)", ("= query", None, "eval_long_rows_val_4k_from1024_c16.json",
                                              "eval_long_rows_val_8k_from1024_c16.json")),
)


def long_rows_validation(results: Results) -> str:
    """Wiki validation perplexity of the undistilled patch at k=64 by where the long-rows policy starts."""
    def cell(name: str | None) -> str:
        return name if name and not name.endswith(".json") else _ratio_at(results, name, 64)
    rows = [[label, *(cell(name) for name in names)] for label, names in LONG_ROWS_POLICY]
    return table(["SmolLM2-135M, undistilled, k=64, wiki validation", "1,024-token windows", "2,048", "4,096",
                  "8,192"], rows)


def long_rows_test(results: Results) -> str:
    """Wiki and BBC test perplexity on long windows: per query on every row, the long-rows policy
    (block_from=1024, with 4 and 16 candidates) and the block grouping with candidates=4 on every row
    (``long_test_table``)."""
    return long_test_table(results, ("eval_long_rows_test", "eval_long_rows_c16_test", "eval_block_cand4_test"),
                           ["query on every row (the default until 2026-12-06)", "block_from=1024, block_candidates=4",
                            "block_from=1024, block_candidates=16 (the default from 2026-12-06)",
                            "block, candidates=4 on every row"])


LONG_ROWS_NEEDLE = (  # label, file, method: the suite's needle in test prose (seed 0, 10 prompts per length)
    ("dense (not SEA)", "retrieval_long_rows_1024_needle.json", "dense"),
    ("query on every row (the default until 2026-12-06)", "retrieval_kernel_default_k64.json", "sea"),
    ("block_from=1024, block_candidates=4", "retrieval_long_rows_1024_needle.json", "sea"),
    ("block_from=2048, block_candidates=4", "retrieval_long_rows_2048_needle.json", "sea"),
    ("block_from=1024, block_candidates=8", "retrieval_long_rows_1024_c8_needle.json", "sea"),
    ("block_from=1024, block_candidates=16 (the default from 2026-12-06)", "retrieval_long_rows_1024_c16_needle.json", "sea"),
)
LONG_ROWS_NEEDLE_VALIDATION = (  # the same in wiki validation prose
    ("dense (not SEA)", "retrieval_validation_long_rows_1024.json", "dense"),
    ("query on every row (the default until 2026-12-06)", "retrieval_validation_default.json", "sea"),
    ("block_from=1024, block_candidates=4", "retrieval_validation_long_rows_1024.json", "sea"),
    ("block_from=1024, block_candidates=8", "retrieval_validation_long_rows_1024_c8.json", "sea"),
    ("block_from=1024, block_candidates=8, query_block=16", "retrieval_validation_long_rows_1024_c8_qb16.json", "sea"),
    ("block_from=1024, block_candidates=16 (the default from 2026-12-06)", "retrieval_validation_long_rows_1024_c16.json", "sea"),
    ("block, candidates=16 on every row", "retrieval_validation_block_c16.json", "sea"),
)


LEVERS_4K = (  # label, needle file (dense and SEA rows), perplexity file (None: none): levers on the default's
    # long rows, wiki validation prose at 4,096 tokens (needle: 10 prompts; perplexity: 2 windows)
    ("the default (block_from=1024, block_candidates=16)", "retrieval_validation_levers_4k_default.json",
     "eval_long_rows_val_4k_from1024_c16.json"),
    ("block_candidates=32", "retrieval_validation_levers_4k_c32.json", "eval_levers_val_4k_c32.json"),
    ("block_from=0, candidates=16: every row selects its own candidates",
     "retrieval_validation_levers_4k_per_query_c16.json", "eval_levers_val_4k_per_query_c16.json"),
    ("the default with key_bounds=True", "retrieval_validation_levers_4k_bounds.json",
     "eval_levers_val_4k_bounds.json"),
    ("the default with gate_form='identity' (an untrained layer returns the sparse context as it is)",
     "retrieval_validation_levers_4k_identity.json", "eval_levers_val_4k_identity.json"),
    ("dense_until=4096: the prompt's rows dense, SEA from the answer's first digit on (a probe, not a lever)",
     "retrieval_validation_levers_4k_dense_prompt.json", None),
    ("the same probe with gate_form='identity'", "retrieval_validation_levers_4k_dense_prompt_identity.json", None),
)


def levers_4k(results: Results) -> str:
    """The needle and the perplexity at 4,096 tokens in wiki validation prose for each of ``LEVERS_4K``,
    dense's needle from the default's run."""
    def needle(name: str, method: str) -> str:
        return answered(_run_row(results, name, method, "needle", 4096))
    rows = [["dense (not SEA)", needle(LEVERS_4K[0][1], "dense"), "-"]]
    rows += [[label, needle(name, "sea"), _ratio_at(results, ppl, 64) if ppl else "-"]
             for label, name, ppl in LEVERS_4K]
    return table(["SmolLM2-135M, undistilled patch, k=64, wiki validation prose", "needle at 4,096 tokens",
                  "perplexity, 2 x 4,096 tokens"], rows)


TOP_P_ORACLE_4K = (  # label, file, method: the suite's needle at 4,096 tokens in wiki validation prose
    ("dense (not SEA)", "retrieval_validation_oracles_4k.json", "dense"),
    ("the default (block_from=1024, block_candidates=16), k=64", "retrieval_validation_levers_4k_default.json", "sea"),
    ("oracle_head: each head's exact top 64 keys", "retrieval_validation_oracles_4k.json", "oracle_head"),
    ("top-p oracle, p=0.85 (at most 512 keys)", "retrieval_top_p_oracle_0.85_4k.json", "top_p"),
    ("top-p oracle, p=0.9 (at most 512 keys)", "retrieval_top_p_oracle_0.9_4k.json", "top_p"),
)


def top_p_oracle_4k(results: Results) -> str:
    """The needle at 4,096 tokens (wiki validation prose) of dense, the default, the 64-key per-head oracle
    and the top-p oracles, with the keys per query and head each used."""
    rows = []
    for label, name, method in TOP_P_ORACLE_4K:
        row = _run_row(results, name, method, "needle", 4096)
        keys = "all" if method == "dense" else num(row["keys_per_query"], 1) if "keys_per_query" in row else "k=64"
        rows.append([label, answered(row), keys])
    return table(["SmolLM2-135M, undistilled, wiki validation prose", "needle at 4,096 tokens",
                  "keys per query and head (top-p: measured mean)"], rows)


FRESHER_COPY_2K = (  # label, file, method: the suite's copy at 2,048 tokens in wiki validation prose
    ("dense (not SEA)", "retrieval_validation_long_rows_1024_c16_copy_2k.json", "dense"),
    ("the default: blocks of 64 rows (query_block=64)", "retrieval_validation_long_rows_1024_c16_copy_2k.json", "sea"),
    ("query_block=16", "retrieval_validation_copy_2k_qb16.json", "sea"),
    ("query_block=8", "retrieval_validation_copy_2k_qb8.json", "sea"),
    ("block_from=0, candidates=16: every row selects its own candidates", "retrieval_validation_copy_2k_per_query_c16.json",
     "sea"),
)


def fresher_copy_2k(results: Results) -> str:
    """The copy at 2,048 tokens (wiki validation prose) as the long rows select more often: exact-token
    accuracy, and the prompts whose first copied token is right."""
    rows = []
    for label, name, method in FRESHER_COPY_2K:
        row = _run_row(results, name, method, "copy", 2048)
        first = round(row["position_accuracy"][0] * row["prompts"])
        rows.append([label, num(row["accuracy"], 2), f"{first}/{row['prompts']}"])
    return table(["SmolLM2-135M, undistilled patch, k=64, wiki validation prose",
                  "copy at 2,048 tokens (exact-token accuracy)", "first copied token right"], rows)


def query_block_cost(results: Results) -> str:
    """One SmolLM2-shaped layer's row-chunked prefill with fresher long-row selections, against the default's."""
    rows = [[f"{r['length']:,}", r["setting"], num(r["seconds"], 3), num(r["x_baseline"], 2)]
            for r in results.load("query_block_cost.json")["rows"]]
    return table(["tokens", "setting", "prefill (s)", "x the default (query_block=64)"], rows)


def needle_table(runs: tuple[tuple[str, str, str], ...], title: str,
                 lengths: tuple[int, ...] = (1024, 2048)) -> Callable[[Results], str]:
    """The needle at each of ``lengths`` of each (label, file, method) run (a run may miss a length)."""
    def render(results: Results) -> str:
        rows = []
        for label, name, method in runs:
            result = results.load(name)
            found = {r["length"]: answered(r) for r in retrieval_rows(result)
                     if r["method"] == method and r["task"] == "needle"}
            rows.append([label, *(found.get(n, "not measured") for n in lengths)])
        return table([title, f"needle at {lengths[0]:,} tokens", *(f"{n:,}" for n in lengths[1:])], rows)
    return render


LONG_ROWS_COPY = (  # label, then (file, method) at 1,024 and 2,048 tokens: the suite's copy task in test prose
    ("dense (not SEA)", ("retrieval_long_rows_1024_c16_copy.json", "dense"),
     ("retrieval_long_rows_1024_c16_copy_2k.json", "dense")),
    ("query on every row (the default until 2026-12-06)", ("retrieval_kernel_default_k64.json", "sea"), ("retrieval_default_copy_2k.json", "sea")),
    ("query, candidates=4", ("retrieval_candidates4_copy_share.json", "sea"), ("retrieval_candidates4_copy_share.json", "sea")),
    ("block_from=1024, block_candidates=16 (the default from 2026-12-06)", ("retrieval_long_rows_1024_c16_copy.json", "sea"),
     ("retrieval_long_rows_1024_c16_copy_2k.json", "sea")),
)


def _run_row(results: Results, name: str, method: str, task: str, length: int) -> dict:
    """The one row of a retrieval file for this method, task and length."""
    found = [r for r in retrieval_rows(results.load(name))
             if r.get("method", "sea") == method and r["task"] == task and r["length"] == length]
    return found[0]


def _per_length(results: Results, runs: tuple, task: str, lengths: tuple[int, ...],
                cell: Callable[[dict], str]) -> list[list[str]]:
    """A table row per (label, (file, method) at each of ``lengths``): ``cell`` of each run's row."""
    return [[label, *(cell(_run_row(results, name, method, task, length))
                      for length, (name, method) in zip(lengths, files))] for label, *files in runs]


def long_rows_copy(results: Results) -> str:
    """Exact-token accuracy of the copy task at 1,024 and 2,048 tokens for each label's runs."""
    rows = _per_length(results, LONG_ROWS_COPY, "copy", (1024, 2048), lambda row: num(row["accuracy"], 2))
    return table(["SmolLM2-135M, undistilled patch, k=64", "copy at 1,024 tokens (exact-token accuracy)", "2,048"], rows)


DEFAULT_LONG_NEEDLE = (  # label, then (file, method) at 4,096 and 8,000 prompt tokens: the suite's needle, test prose
    ("dense (not SEA)", ("retrieval_needle_4k_per_query.json", "dense"), ("retrieval_needle_8k.json", "dense")),
    ("query on every row (the default until 2026-12-06)", ("retrieval_needle_4k_per_query.json", "sea"),
     ("retrieval_needle_8k_sea.json", "sea")),
    ("block_from=1024, block_candidates=16 (the default from 2026-12-06)",
     ("retrieval_needle_default_4k_8k.json", "sea"), ("retrieval_needle_default_4k_8k.json", "sea")),
)


def default_long_needle(results: Results) -> str:
    """The suite's needle at 4,096 and 8,000 tokens: dense, the former default and the long-rows default."""
    rows = _per_length(results, DEFAULT_LONG_NEEDLE, "needle", (4096, 8000), answered)
    return table(["SmolLM2-135M, undistilled patch, k=64, test prose", "needle at 4,096 tokens", "8,000"], rows)


def distill_windows(results: Results) -> str:
    """Wiki validation at 4,096-token windows of the demo's recipe distilled on 512- and 2,048-token windows."""
    runs = (("512 (the demo's model)", "eval_val_4k_demo_512.json"), ("2,048", "eval_val_4k_distill_2048.json"))
    rows = [[label, _ratio_at(results, name, 64)] for label, name in runs]
    return table(["SmolLM2-135M, the demo's recipe (40 steps), distillation windows", "wiki validation, 4,096-token "
                  "windows, SEA@64"], rows)


def default_passkey(results: Results) -> str:
    """The suite's passkey at 1k / 2k / 4k: dense, per query on every row and the long-rows default."""
    rows = [[label, passkey(name, method, k)(results)] for label, name, method, k in (
        ("dense (not SEA)", PASSKEY_DEFAULT, "dense", None),
        ("query on every row (the default until 2026-12-06)", "passkey_smollm2_per_query_k256.json", "sea", 64),
        ("block_from=1024, block_candidates=16 (the default from 2026-12-06)", PASSKEY_DEFAULT, "sea", 64))]
    return table(["SmolLM2-135M, undistilled patch, k=64", "passkey: 1k, 2k, 4k tokens"], rows)


DEMO_LONG = (("wiki test, 4,096-token windows", "eval_demo_default_wiki_4k.json"),
             ("8,192-token windows", "eval_demo_default_wiki_8k.json"))


def demo_long(results: Results) -> str:
    """The demo's distilled model at long windows with the default: dense and SEA@64 perplexity."""
    rows = [[label, num(_eval_ppl(results, name), 2), _ratio_at(results, name, 64)] for label, name in DEMO_LONG]
    return table(["the model `sea demo` distils (512-token windows), the default's long rows", "dense", "SEA, k=64"], rows)


QUALITY_LONG = (  # text, window, the per-query era's `sea compare` file (None: not run), this session's `sea eval` file
    ("wiki", 1024, "compare_smollm2_sea_K512_rows128x4_500x1024_wiki.json", "eval_k512_test_wiki_1024.json"),
    ("wiki", 4096, "compare_smollm2_sea_K512_rows128x4_500x1024_4096_wiki.json", "eval_k512_test_wiki_4096.json"),
    ("wiki", 8192, "compare_smollm2_sea_K512_rows128x4_500x1024_8192_wiki.json", "eval_k512_test_wiki_8192.json"),
    ("bbc", 1024, "compare_smollm2_sea_K512_rows128x4_500x1024_bbc.json", "eval_k512_test_bbc_1024.json"),
    ("bbc", 4096, "compare_smollm2_sea_K512_rows128x4_500x1024_4096_bbc.json", "eval_k512_test_bbc_4096.json"),
    ("bbc", 8192, None, "eval_k512_test_bbc_8192.json"))


def quality_recipe_long(results: Results) -> str:
    """The quality recipe (K=512, 500 row-subset steps) on test windows: per query on every row (the
    earlier distillation's `sea compare` files) and the long-rows default (this session's, `sea eval`)."""
    rows = [[f"{text} test, {length:,}-token windows",
             ppl(old, "sea", (64,), ratio=True)(results) if old else "not run",
             num(_eval_ppl(results, new)), _ratio_at(results, new, 64)] for text, length, old, new in QUALITY_LONG]
    return table(["K=512, 500 row-subset steps on 1,024-token windows; SEA@64", "per query on every row (earlier run)",
                  "dense", "the long-rows default"], rows)


def quality_recipe_continued(results: Results) -> str:
    """The quality recipe and its continuation on 2,048-token windows, wiki validation, SEA@64."""
    rows = [[label, *(_ratio_at(results, f"eval_k512{tag}_val_wiki_{length}.json", 64) for length in (1024, 4096))]
            for label, tag in (("the quality recipe", ""), ("+ 100 steps on 2,048-token windows", "_2k"))]
    return table(["SmolLM2-135M, K=512, the long-rows default, SEA@64", "wiki validation, 4 x 1,024 tokens",
                  "2 x 4,096 tokens"], rows)


def needle_diagnosis(name: str) -> Callable[[Results], str]:
    """``sea diagnose --task`` of one failing needle prompt (the file ``name``): per band of layers, the mean
    (over answer steps and heads) dense top-4 mass SEA held and how often it held the top-1 key."""
    def render(results: Results) -> str:
        report = results.load(name)
        rows = []
        for first, last in ((0, 2), (3, 8), (9, 29)):
            values = {key: [x for i in range(first, last + 1) for row in report["layers"][str(i)][key] for x in row]
                      for key in ("selected_mass", "top1_selected")}
            rows.append([f"{first}-{last}", *(num(sum(v) / len(v), 3) for v in values.values())])
        return table(["layers", "dense top-4 mass SEA held", "dense top-1 key held"], rows)
    return render


def needle_margins(name: str) -> Callable[[Results], str]:
    """``sea diagnose --task`` of one prompt (the file ``name``), per answer step: the dense top-4 mass SEA
    held (mean over layers and heads) beside dense's and SEA's margin for the dense token."""
    def render(results: Results) -> str:
        report = results.load(name)
        layers = [report["layers"][key]["selected_mass"] for key in sorted(report["layers"], key=int)]
        rows = []
        for step in range(report["steps"]):
            held = [x for layer in layers for x in layer[step]]
            rows.append([str(step), num(sum(held) / len(held), 3), f"{report['dense_margin'][step]:+.2f}",
                         f"{report['sea_margin'][step]:+.2f}"])
        return table(["answer step", "dense top-4 mass SEA held", "dense margin", "SEA margin"], rows)
    return render


def long_test_table(results: Results, prefixes: tuple[str, ...], labels: list[str]) -> str:
    """Wiki and BBC test perplexity on long windows: the default (the forced-keys section's before-run,
    beside its after-run's dense), then each ``prefix``'s ``sea eval`` run beside its own run's dense;
    ``labels`` name the default and the runs."""
    rows = []
    for text_name in ("wiki", "bbc"):
        for length in (4096, 8192):
            dense = {r["name"]: r["perplexity"] for r in
                     results.load(f"eval_forced_after_test_{text_name}_{length}.json")["rows"]}["dense"]
            default = results.load(f"ppl_forced_before_test_{text_name}_{length}.json")["perplexity"]
            runs = [{r["name"]: r["perplexity"] for r in results.load(f"{prefix}_{text_name}_{length}.json")["rows"]}
                    for prefix in prefixes]
            rows.append([f"{text_name} test, {8192 // length} x {length:,} tokens", num(dense),
                         ppl_ratio(default, dense), *(ppl_ratio(run["sea"], run["dense"]) for run in runs)])
    return table(["SmolLM2-135M, undistilled patch, k=64", "dense", *labels], rows)


def block_refined_test(results: Results) -> str:
    """The default against the block grouping with candidates=4 on long test windows (``long_test_table``)."""
    return long_test_table(results, ("eval_block_cand4_test",),
                           ["SEA default (per query)", "SEA, block grouping, candidates=4"])


def dense_layers_needle(results: Results) -> str:
    """The needle at 4,096 tokens in wiki validation prose (10 prompts): dense, SEA, SEA with layers 3-10 dense,
    SEA with exact refinement (per query, and with the block grouping)."""
    rows = []
    for label, name, method in (("dense", "needle_dense_layers_3_10_4k.json", "dense"),
                                ("SEA@64, every layer", "needle_dense_layers_none_4k.json", "sea"),
                                ("SEA@64, layers 3-10 dense", "needle_dense_layers_3_10_4k.json", "sea"),
                                ("SEA@64, candidates=4", "needle_candidates4_4k.json", "sea"),
                                ("SEA@64, block grouping, candidates=4", "needle_block_cand4_4k.json", "sea"),
                                ("SEA@64, block grouping, query_block=16, candidates=4", "needle_block_qb16_cand4_4k.json",
                                 "sea"),
                                ("SEA@64, block grouping, candidates=4, layers 3-8 dense",
                                 "needle_block_cand4_dense3_8_4k.json", "sea")):
        point = next(p for p in results.load(name)["points"] if p["method"] == method)
        rows.append([label, answered(point)])
    return table(["SmolLM2-135M (undistilled patch), needle in wiki validation prose, 4,096 tokens",
                  "correct / prompts"], rows)


def grouping_quality_4k(results: Results) -> str:
    """Wiki validation perplexity of the undistilled patch on 4,096-token windows: per query against block."""
    rows = []
    for label, name, k in (("query (default)", "eval_dense_until_0_4k.json", 64),
                           ("block", "eval_block_4k.json", 32), ("block", "eval_block_4k.json", 64)):
        result = results.load(name)
        dense = next(r for r in result["rows"] if r["name"] == "dense")
        sea = next(r for r in result["rows"] if r["name"] == "sea" and r["k"] == k)
        rows.append([label, str(k), *ppl_cells(dense, sea)])
    return table(["grouping (SEA, undistilled)", "k", "tokens", "dense", "SEA", "x dense"], rows)


def needle_8k(results: Results) -> str:
    """The suite's needle at 8,000 prompt tokens: dense (its run was stopped before SEA's row) and SEA."""
    dense = next(p for p in results.load("retrieval_needle_8k.json")["points"] if p["method"] == "dense")
    sea = results.load("retrieval_needle_8k_sea.json")["rows"][0]
    rows = [["dense attention (every key)", "-", answered(dense)],
            ["SEA, `sea.patch` defaults (undistilled)", str(sea["k"]), answered(sea)]]
    return table(["SmolLM2-135M, needle in wiki/BBC test prose, 8,000 prompt tokens", "k", "correct / prompts"], rows)


KEY_BOUNDS = [  # (label, needle files at 1k/2k and 4k or None, perplexity file or None, diagnosis at 4k or None)
    ("dense (not SEA)", ("retrieval_validation_default.json", "retrieval_validation_default_4k.json"), None, None),
    ("SEA, `sea.patch` defaults (undistilled)", ("retrieval_validation_default.json",
     "retrieval_validation_default_4k.json"), "retrieval_kernel_default_k64.json", "diagnose_validation_default_4k.json"),
    ("SEA, `key_bounds=True` (undistilled)", ("retrieval_validation_bounds.json", "retrieval_validation_bounds_4k.json"),
     "ppl_validation_bounds.json", "diagnose_validation_bounds_4k.json"),
    ("SEA, key bounds instead of the mean key (undistilled)", ("retrieval_validation_bounds_only_1k.json",), None, None),
    ("SEA, the demo's 40 distillation steps", ("retrieval_validation_demo_plain.json",),
     "retrieval_validation_demo_plain.json", None),
    ("SEA, `key_bounds=True`, the demo's 40 steps", ("retrieval_validation_demo_bounds.json",),
     "retrieval_validation_demo_bounds.json", None),
    ("SEA, candidates=4 (exact refinement, undistilled)", ("retrieval_validation_candidates4.json",),
     "ppl_candidates4_k64.json", None),
    ("SEA, candidates=4 and `key_bounds=True` (undistilled)", ("retrieval_validation_candidates4_bounds.json",),
     "retrieval_validation_candidates4_bounds.json", None),
]


def key_bounds(results: Results) -> str:
    """Needles in wiki validation prose, perplexity and coverage on wiki validation, with and without key bounds."""
    rows = []
    for label, needles, perplexity, diagnosis in KEY_BOUNDS:
        method = "dense" if label.startswith("dense") else "sea"
        found = {r["length"]: answered(r) for name in needles
                 for r in results.load(name)["rows"] if r["method"] == method and r["task"] == "needle"}
        cells = [found.get(n, "not run") for n in (1024, 2048, 4096)]
        if perplexity is None:
            cells.append("-" if method == "dense" else "not measured")
        else:
            by = {r["name"]: r["perplexity"] for r in results.load(perplexity)["perplexity"]["rows"]}
            cells.append(f"{num(by['sea'])} (x{num(by['sea'] / by['dense'], 3)})")
        summary = results.load(diagnosis)["summary"] if diagnosis else None
        cells.append(f"{num(summary['coverage_sea'], 3)} / {num(summary['recall'], 3)}" if summary else "-")
        rows.append([label] + cells)
    return table(["SmolLM2-135M, k=64 (wiki validation prose)", "needle 1,024", "needle 2,048", "needle 4,096",
                  "perplexity, 4 x 1,024 tokens", "coverage / recall at 4,096"], rows)


def needle_bin_ranks(results: Results) -> str:
    """Where the bin of the key a retrieval step needs ranks, by signal (``needle_bin_ranks.py``)."""
    rows = []
    for name in ("needle_bin_ranks_1k.json", "needle_bin_ranks_2k.json", "needle_bin_ranks_4k.json"):
        result = results.load(name)
        for signal, label in (("mean", "mean key"), ("bound", "key bound"), ("sum", "both (key_bounds=True)")):
            r = result["signals"][signal]
            rows.append([f"{result['length']:,}", label, f"{r['steps']:,}", num(r["median_rank"], 0),
                         num(r["below_4"], 3), num(r["below_16"], 3)])
    return table(["prompt tokens", "bin signal", "(row, layer, head) steps", "median rank", "share ranked < 4",
                  "share ranked < 16"], rows)


def decode_latency(results: Results) -> str:
    rows = [[f"{r['context']:,}", num(r["dense_ms"], 1), num(r["sea_ms"], 1)]
            for r in results.load("decode_latency_smollm2-135m.json")["rows"]]
    return table(["context tokens", "dense ms/token", "SEA ms/token"], rows)


def distill_throughput(results: Results) -> str:
    result = results.load("distill_throughput.json")
    rows = [[r["trainer"], num(r["seconds_per_step"], 1), num(r["teacher_tokens_per_s"], 1), num(r["rows_per_s"], 1),
             str(r["steps"]), ", ".join(f"{c['sea']:.2f} @ {c['minutes']:.1f}" for c in r["curve"]),
             num(r["curve"][0]["dense"])] for r in result["results"]]
    return table(["trainer", "s/step", "teacher tokens/s", "query rows/s", "steps",
                  "SEA@64 validation perplexity @ minute", "dense"], rows)


def distill_runs(results: Results) -> str:
    """The estimator stages: wall time, estimate KL at the first step and over the last 50, command."""
    rows, commands = [], []
    for name in ("distill_smollm2_K256_rows128x4_300x1024.json", "distill_smollm2_K512_rows128x4_500x1024.json"):
        result = results.load(name)
        steps = result["steps"]
        last = [s["estimate_kl"] for s in steps[-50:]]
        rows.append([str(result["estimate_width"]), str(len(steps)), f"{result['wall_seconds']:,}",
                     num(steps[0]["estimate_kl"]), num(sum(last) / len(last))])
        commands.append(result["command"])
    body = table(["K", "steps", "wall s", "estimate KL, step 1", "estimate KL, mean of the last 50 steps"], rows)
    return body + "\n\n```bash\n" + "\n".join(commands) + "\n```"


def diagnose(results: Results) -> str:
    """`sea diagnose` summaries: teacher mass each selection covers at k=64, recall, the estimate's KL."""
    files = [("an earlier demo recipe, 35 x 512 steps", "diagnose_demo_budget.json"),
             ("same, rows past the first quarter", "diagnose_demo_budget_skip25.json"),
             ("`sea demo` (defaults, 40 row-subset steps)", "demo_diagnosis.json")]
    files += [(f"{label}", pattern.format(t)) for label, pattern in DIAG.items() for t in ("wiki", "bbc")]
    rows = []
    for label, name in files:
        r = results.load(name)
        s = r["summary"]
        rows.append([label, f"{r['data']}/{r['split']}" if "split" in r else r["data"], str(r["tokens"]),
                     *(num(s[f"coverage_{m}"], 3) for m in ("sea", "oracle", "oracle_head", "window_sinks")),
                     num(s["recall"], 3), num(s["estimate_kl"])])
    return table(["SEA model", "text", "tokens", "SEA", "oracle", "oracle_head", "window_sinks",
                  "recall", "estimate KL"], rows)


def demo(results: Results) -> str:
    result = results.load("demo_results.json")
    by = {(r["name"], r["k"]): r["perplexity"] for r in result["rows"]}
    dense = by["dense", None]
    cell = lambda name, k: f"{by[name, k]:.2f} ({100 * (by[name, k] / dense - 1):+.1f} %)"  # noqa: E731
    rows = [[str(k), num(dense), cell("oracle", k), cell("sea", k), cell("window", k)] for k in KS]
    note = (f"{result['distill_steps']} estimator steps of {result['train_seq_len']} tokens "
            f"({result['query_rows']} query rows, {result['updates_per_pass']} steps per teacher pass), "
            f"{result['distill_seconds']:.0f} s of distillation.")
    return table(["k", "dense", "oracle", "SEA", "window_sinks"], rows) + "\n\n" + note


def quality_targets(results: Results) -> str:
    rows = [[c["target"], c["text"], num(c["measured"], 3), num(c["bound"], 2), "met" if c["met"] else "**missed**"]
            for c in results.load("quality_targets_K512.json")["checks"]]
    return table(["target", "text", "measured", "bound", ""], rows)


def grouping_quality(results: Results) -> str:
    rows = [[r["grouping"], num(r["k"], 0) if r["k"] else "-", str(r["block"] or "-"), num(r["perplexity"]),
             num(r["keys_per_query"], 1)] for r in results.load("quality_grouping.json")["rows"]]
    return table(["grouping", "k", "block", "perplexity", "keys/query/head"], rows)


def validation_k(results: Results) -> str:
    rows = []
    for width in (128, 256, 512):
        point = results.point(f"validation_smollm2_sea_K{width}_k64.json", "sea", 64)
        dense = results.point(f"validation_smollm2_sea_K{width}_k64.json", "dense", None)
        rows.append([str(width), num(dense["perplexity"]), num(point["perplexity"]), num(point["coverage"], 3)])
    return table(["K", "dense", "SEA@64", "coverage@64"], rows)


# ---- encoders: a fine-tuned MiniLM classifier (issue 23, benchmarks/encoder_tasks.sh) ---------------

ENCODER_KS = (8, 16, 32, 64)
# (task label, eval file, teacher eval file: the fine-tuned dense model, evaluated alone)
T1000 = ("task_minilm_bbc_topics_512_t1000_k8_16.json", "task_minilm_bbc_topics_512_t1000_k32_64.json")
ENCODER_TEST = [("BBC topics, 512 tokens: teacher of 1,000 articles, undistilled, identity gates", T1000, T1000[0]),
                ("BBC topics, 512 tokens: teacher of 160 articles, undistilled, identity gates", TASKS["bbc"],
                 "task_minilm_bbc_topics_512_keybins_teacher.json"),
                ("BBC topics, 512 tokens: estimator 10 + full KD 8 steps, sigmoid gates",
                 ("task_minilm_bbc_topics_512_keybins.json",), "task_minilm_bbc_topics_512_keybins_teacher.json"),
                ("RT polarity, 64 tokens: teacher of 4,000 snippets, undistilled, identity gates",
                 ("task_minilm_rt_polarity_t4000.json",), "task_minilm_rt_polarity_t4000.json"),
                ("RT polarity, 64 tokens: teacher of 1,600 snippets, undistilled, identity gates", TASKS["rt"],
                 "task_minilm_rt_polarity_teacher.json")]
# (task, model, k, file): the validation runs that chose the tested models
ENCODER_VALIDATION = [
    ("BBC", "teacher of 1,000 articles: undistilled, identity gates", 64, "task_minilm_bbc_512_val_t1000.json"),
    ("BBC", "undistilled, sigmoid gates", 64, "task_minilm_bbc_512_val_undistilled_sigmoid.json"),
    ("BBC", "undistilled, no gates (= identity gates, untrained)", 64, "task_minilm_bbc_512_val_undistilled_nogates.json"),
    ("BBC", "undistilled, identity gates, `key_bounds=True`", 64, "task_minilm_bbc_512_val_undistilled_bounds.json"),
    ("BBC", "estimator 10 steps, identity gates", 64, "task_minilm_bbc_512_val_est10_identity.json"),
    ("BBC", "estimator 10 + full KD 8 steps, sigmoid gates", 64, "task_minilm_bbc_512_val_full8_sigmoid.json"),
    ("BBC", "estimator 10 + full KD 8 steps, identity gates", 64, "task_minilm_bbc_512_val_full8_identity.json"),
    ("BBC", "estimator 10 + full KD 24 steps, identity gates", 64, "task_minilm_bbc_512_val_full24_identity.json"),
    ("RT", "teacher of 4,000 snippets: undistilled, identity gates", 16, "task_minilm_rt_val_t4000.json"),
    ("RT", "undistilled, identity gates", 16, "task_minilm_rt_val_undistilled_identity.json"),
    ("RT", "estimator 15 + full KD 10 steps, identity gates", 16, "task_minilm_rt_val_est15_full10_identity.json")]


def encoder_tests(results: Results) -> str:
    """Per task: accuracy (%) of the teacher, the evaluated model's dense, oracle and SEA at k = 8 / 16 / 32 / 64,
    keys per query actually used ('-': a budget not evaluated)."""
    rows = []
    for label, names, teacher_name in ENCODER_TEST:
        result = merge_results([results.load(name) for name in names])
        teacher = results.load(teacher_name)["rows"][0]
        by = {(r["method"], r["k"]): r for r in result["rows"]}
        pct = lambda rs: joined("-" if r is None else num(100 * r["accuracy"], 1) for r in rs)  # noqa: E731
        keys = lambda rs: joined("-" if r is None else num(r["keys_per_query"], 1) for r in rs)  # noqa: E731
        rows.append([label, str(result["examples"]), num(100 * teacher["accuracy"], 1),
                     num(100 * by["dense", None]["accuracy"], 1)]
                    + [f"{pct(rs)} ({keys(rs)})" for rs in ([by.get(("oracle", k)) for k in ENCODER_KS],
                                                           [by.get(("sea", k)) for k in ENCODER_KS])])
    return table(["task and model (test split)", "texts", "teacher", "dense", "oracle k=8/16/32/64 (keys/query)",
                  "SEA k=8/16/32/64 (keys/query)"], rows)


def encoder_validation(results: Results) -> str:
    """Validation: texts right with the model's dense attention and with SEA at k, keys per query, coverage."""
    rows = []
    for task, label, k, name in ENCODER_VALIDATION:
        result = results.load(name)
        by = {(r["method"], r["k"]): r for r in result["rows"]}
        right = lambda r: f"{round(r['accuracy'] * result['examples'])}/{result['examples']}"  # noqa: E731
        sea = by["sea", k]
        rows.append([task, label, right(by["dense", None]), str(k), right(sea), num(sea["keys_per_query"], 1),
                     num(sea["coverage"], 3)])
    return table(["task", "MiniLM model (validation split)", "dense", "k", "SEA", "keys/query", "coverage"], rows)


# ---- long inputs, passkey, full KD and the README's summary --------------------------------------

LONG_COLUMNS = ("dense", "window_sinks", "K=128", "K=256", "K=256, 300 steps", "K=512", "K=512, 500 steps")
LONG_ROWS: list[tuple[str, int, tuple[str | None, ...]]] = [
    ("wiki", 1024, (FREE, FREE, K128["wiki"], K256["wiki"][0], EST256["wiki"], K512["wiki"], EST512["wiki"])),
    ("wiki", 2048, ("compare_smollm2_2048_k64.json",) * 2 + (None, "compare_smollm2_2048_k64.json", None, None)
     + ("compare_smollm2_sea_K512_rows128x4_500x1024_2048_wiki.json",)),
    ("wiki", 4096, ("compare_smollm2_4096_k64.json",) * 3 + (
        "compare_smollm2_4096_k64_K256.json", "compare_smollm2_sea_K256_rows128x4_300x1024_4096_wiki.json",
        "compare_smollm2_4096_k64_K512.json", "compare_smollm2_sea_K512_rows128x4_500x1024_4096_wiki.json")),
    ("wiki", 8192, ("compare_smollm2_sea_K512_rows128x4_500x1024_8192_wiki.json",) * 2 + (None,) * 4
     + ("compare_smollm2_sea_K512_rows128x4_500x1024_8192_wiki.json",)),
    ("bbc", 1024, (BBC, BBC, BBC, K256["bbc"][0], EST256["bbc"], K512["bbc"], EST512["bbc"])),
    ("bbc", 4096, ("compare_smollm2_bbc_4096_k64.json",) * 3 + (
        "compare_smollm2_bbc_4096_k64_K256.json", "compare_smollm2_sea_K256_rows128x4_300x1024_4096_bbc.json",
        None, "compare_smollm2_sea_K512_rows128x4_500x1024_4096_bbc.json")),
]


def long_cell(results: Results, text_name: str, length: int, column: str, name: str | None) -> str:
    """Perplexity at k=64 (x dense) of one column's method, from a file checked to hold that text and length."""
    if name is None:
        return "-"
    result = results.load(name)
    if (result["data"], result["setup"]["seq_len"]) != (text_name, length):
        raise ValueError(f"{name}: holds {result['data']} at {result['setup']['seq_len']} tokens, "
                         f"the long-inputs row wants {text_name} at {length}")
    method = column if column in ("dense", "window_sinks") else "sea"
    return ppl(name, method, ks=(64,), ratio=method != "dense")(results)


def long_inputs(results: Results) -> str:
    rows = [[text_name, f"{length:,}"] + [long_cell(results, text_name, length, column, name)
                                          for column, name in zip(LONG_COLUMNS, names)]
            for text_name, length, names in LONG_ROWS]
    return table(["text", "tokens per window"] + [f"{c} @64" if c == "window_sinks" else c for c in LONG_COLUMNS], rows)


PASSKEY = "passkey_smollm2_1k_4k.json"
PASSKEY_256 = "passkey_smollm2_K256_rows128x4_300x1024.json"
PASSKEY_512 = "passkey_smollm2_K512_rows128x4_500x1024.json"
PASSKEY_DEFAULT = "passkey_smollm2_default_long_rows.json"  # the long-rows default, undistilled


def passkey_table(results: Results) -> str:
    rows = [("dense", PASSKEY, "dense", None), ("window_sinks @64", PASSKEY, "window_sinks", 64),
            ("quest @64", PASSKEY, "quest", 64), ("SEA undistilled, K=128 @64", PASSKEY, "sea", 64),
            ("dense", PASSKEY_256, "dense", None), ("SEA K=256, 300 steps @64", PASSKEY_256, "sea", 64),
            ("dense", PASSKEY_512, "dense", None)]
    rows += [(f"SEA K=512, 500 steps @{k}", PASSKEY_512, "sea", k) for k in KS]
    return table(["method", "correct at 1,024, 2,048, 4,096 tokens"],
                 [[label, passkey(name, method, k)(results)] for label, name, method, k in rows])


FULL_KD = "full_kd_smollm2_30x1024.json"


def full_kd(results: Results) -> str:
    """Full KD, 30 x 1024 steps each: test perplexity per budget, the tuned model's dense, wall s of the steps."""
    rows = [["the original teacher, dense", ppl(FREE, "dense")(results), ppl(BBC, "dense")(results), "-", "-"]]
    for method in ("sea", "performer", "cosformer"):
        names = [f"compare_smollm2_{method}_full_kd_30x1024_{t}.json" for t in ("wiki", "bbc")]
        rows.append([method, *(ppl(n, method)(results) for n in names),
                     joined(ppl(n, "dense")(results) for n in names), num(results.load(FULL_KD)[method]["seconds"], 0)])
    return table(["method (full KD, 30 x 1024 tokens)", "wiki test: k=32 / 64 / 128", "BBC test: k=32 / 64 / 128",
                  "the tuned model, dense: wiki / BBC", "wall s of the steps"], rows)


def passkey_or(name: str | None, method: str = "sea", k: int | None = 64) -> Cell:
    return passkey(name, method, k) if name else NOT_MEASURED


def attention_cell(name: str | None) -> Cell:
    """Per-query and block SEA (or SDPA for name's dense row), T=4,096, from one `sea bench attention` file."""
    if name is None:
        return NOT_MEASURED
    if name.startswith("sdpa:"):
        return speed(name.removeprefix("sdpa:"), "sdpa", 4096)
    if name == DEFAULT_ATTENTION:  # the default's row-chunked prefill, and per query on every row (the former default)
        return lambda r: (f"{speed(name, 'sea_long_rows_c16_chunked', 4096)(r)}; per query on every row "
                          f"{speed(name, 'sea_chunked', 4096)(r)}")
    return lambda r: f"{speed(name, 'sea', 4096)(r)}; block {speed(name, 'sea_block', 4096)(r)}"


def at64(names: str | tuple[str, ...], method: str = "sea") -> Cell:
    """Perplexity at k=64 (x dense)."""
    return ppl(names, method, ks=(64,), ratio=True)


SUMMARY = grid(
    ["method", "wiki test, k=64 (x dense)", "BBC test, k=64 (x dense)", "passkey @64: 1k, 2k, 4k tokens",
     "attention forward, T=4,096: s (peak MB)"],
    [[text("dense (SDPA)"), ppl(FREE, "dense"), ppl(BBC, "dense"), passkey_or(PASSKEY, "dense", None),
      attention_cell(f"sdpa:{DEFAULT_ATTENTION}")],
     [text("oracle top-k (needs the dense map)"), at64(FREE, "oracle"), at64(BBC_ORACLE, "oracle"),
      NOT_MEASURED, NOT_MEASURED],
     [text("window_sinks (StreamingLLM)"), at64(FREE, "window_sinks"), at64(BBC, "window_sinks"),
      passkey_or(PASSKEY, "window_sinks"), NOT_MEASURED],
     [text("quest"), at64(FREE, "quest"), NOT_MEASURED, passkey_or(PASSKEY, "quest"), NOT_MEASURED],
     [text("DSA indexer, 40 steps"), at64("compare_smollm2_indexer.json", "indexer"),
      at64("compare_smollm2_indexer_bbc.json", "indexer"), NOT_MEASURED, NOT_MEASURED],
     [text("Performer, full KD 30 steps (every key)"),
      ppl("compare_smollm2_performer_full_kd_30x1024_wiki.json", "performer"),
      ppl("compare_smollm2_performer_full_kd_30x1024_bbc.json", "performer"), NOT_MEASURED, NOT_MEASURED],
     [text("**SEA, `sea.patch` defaults (K=256), no training**"), at64(K256["wiki"]), at64(K256["bbc"]),
      passkey_or(PASSKEY_DEFAULT), attention_cell(DEFAULT_ATTENTION)],
     [text("SEA, K=256, 300 row-subset steps"), at64(EST256["wiki"]), at64(EST256["bbc"]),
      passkey_or(PASSKEY_256), attention_cell("attention_K256.json")],
     [text("**SEA, K=512, 500 row-subset steps**"), at64(EST512["wiki"]), at64(EST512["bbc"]),
      passkey_or(PASSKEY_512), attention_cell("attention_K512.json")]])



FORCED_RULES = (("forced bins (the default)", "before"), ("forced_keys=True", "after"))


def forced_budget(results: Results) -> str:
    """``forced_budget.py``: a head's keys at k=64 split into forced and estimated, per rule and row length."""
    rows = [["forced_keys=True" if r["forced_keys"] else "forced bins (the default)", f"{r['length']:,}",
             num(r["keys_per_head"], 1), num(r["forced_keys_per_head"], 1), num(r["estimate_keys_per_head"], 1)]
            for r in results.load("forced_budget.json")["rows"]]
    return table(["rule (9 heads, K=256, k=64, sinks 4, window 16)", "row keys", "keys per head", "forced",
                  "chosen by the estimate"], rows)


def forced_keys_quality(results: Results) -> str:
    """The undistilled patch under both rules: wiki validation perplexity on long windows and needles."""
    def perplexity(rule: str, length: int) -> tuple[str, str]:
        rows = {r["name"]: r for r in results.load(f"eval_forced_{rule}_validation_{length}.json")["rows"]}
        return num(rows["dense"]["perplexity"]), f"{num(rows['sea']['perplexity'])} (x{num(rows['sea']['perplexity'] / rows['dense']['perplexity'], 3)})"

    def needles(name: str, method: str) -> list[str]:
        found = {r["length"]: answered(r) for r in results.load(name)["rows"] if r["method"] == method}
        return [found.get(n, "not run") for n in (4096, 8000)]

    dense = [perplexity("before", n)[0] for n in (4096, 8192)]
    rows = [["dense (not SEA)"] + dense + needles("retrieval_validation_default_4k.json", "dense")]
    for label, rule in FORCED_RULES:
        rows.append([f"SEA@64, {label}"] + [perplexity(rule, n)[1] for n in (4096, 8192)]
                    + needles(f"retrieval_forced_{rule}_validation.json", "sea"))
    return table(["SmolLM2-135M, undistilled patch (wiki validation)", "perplexity, 2 x 4,096 tokens",
                  "perplexity, 1 x 8,192 tokens", "needle 4,096 (5 prompts)", "needle 8,000 (5 prompts)"], rows)



def forced_sinks(results: Results) -> str:
    """SEA@64 (forced keys, undistilled) on wiki validation by the number of sink and window keys."""
    dense = {n: next(r for r in results.load(f"eval_forced_after_validation_{n}.json")["rows"]
                     if r["name"] == "dense")["perplexity"] for n in (4096, 8192)}
    rows = [[str(r["sinks"]), str(r["local_window"]), f"{r['seq_len']:,}", num(r["perplexity"]),
             num(r["perplexity"] / dense[r["seq_len"]], 3)] for r in results.load("forced_sinks_validation.json")["rows"]]
    return table(["sinks (forced keys)", "local window", "window tokens", "SEA@64", "x dense"], rows)



def retrieval_mix(results: Results) -> str:
    """``distill_retrieval_mix.py``: the demo's estimator recipe with and without task windows mixed in."""
    rows = []
    for label, name in (("the demo's recipe (wiki train windows)", "retrieval_mix_0.json"),
                        ("half the windows: needle, multi-needle and copy prompts", "retrieval_mix_05.json")):
        result = results.load(name)
        found = {(r["task"], r["length"]): r for r in result["rows"]}
        by = {r["name"]: r["perplexity"] for r in result["perplexity"]["rows"]}
        rows.append([label, *(answered(found[('needle', n)]) for n in (1024, 2048)),
                     num(found[("copy", 1024)]["accuracy"], 3), f"{num(by['sea'])} (x{num(by['sea'] / by['dense'], 3)})"])
    return table(["SEA@64 after 40 estimator steps on", "needle 1,024", "needle 2,048", "copy 1,024 (token accuracy)",
                  "perplexity, 4 x 1,024 tokens"], rows)



def residual_bins(results: Results) -> str:
    """``residual_bins.py``: SEA's keys exactly, with or without a bin-level weight for the keys it left out
    (2 x 512 tokens: every variant from the script; 2 x 4,096: dense and SEA from the length policy's run)."""
    policy = {r["name"]: r["perplexity"] for r in results.load("eval_dense_until_0_4k.json")["rows"]}
    short = {v: results.load(f"residual_bins_{v}_512.json")["perplexity"] for v in ("dense", "sea", "none", "meankey",
                                                                                   "exact_mass")}
    long = {"dense": policy["dense"], "sea": policy["sea"], "none": None,
            **{v: results.load(f"residual_bins_{v}_4k.json")["perplexity"] for v in ("meankey", "exact_mass")}}
    labels = (("dense", "dense (not SEA)"), ("sea", "SEA as patched (gates, average branch)"),
              ("none", "exact softmax on SEA's keys only"),
              ("meankey", "+ each bin's other keys at its mean-key logit, its mean value"),
              ("exact_mass", "+ each bin's other keys at their exact mass, its mean value (oracle)"))
    rows = [[label, *(f"{num(ppl[v])} (x{num(ppl[v] / ppl['dense'], 3)})" if ppl[v] is not None else "not run"
                      for ppl in (short, long))] for v, label in labels]
    return table(["SmolLM2-135M, undistilled patch, k=64, wiki validation", "2 x 512 tokens", "2 x 4,096 tokens"], rows)


Labels = tuple[tuple[str, str], ...]  # (label, file tag) pairs
STATE_RUNS = (("2 (final code)", "2"), ("1 (steps that estimate nothing did not move the edges)", "1"))
STATE_CODES = (("the whole table (before)", "before"), ("the running sums at the bin edges (after)", "after"))
READS_RUNS = (("1", "1"), ("2", "2"))
READS_CODES = (("before", "before"), ("after", "after"))


def before_after_steps(prefix: str, runs: Labels, codes: Labels) -> Callable[[Results], str]:
    """`sea bench decode` of two trees (``codes``: before, after), one after the other in each run:
    ``{prefix}_{code}_{run}.json``."""
    def rule(results: Results) -> str:
        rows = []
        for run_label, run in runs:
            by = [{(p["method"], p["length"]): p["seconds"] * 1e3
                   for p in results.load(f"{prefix}_{tag}_{run}.json")["points"]} for _, tag in codes]
            for length in sorted({n for _, n in by[0]}):
                rows.append([run_label, f"{length:,}", *(num(b["sdpa", length], 2) for b in by),
                             *(num(b["sea", length], 2) for b in by), num(by[1]["sea", length] / by[0]["sea", length])])
        return table(["run", "prompt tokens", "SDPA ms/token (before's run)", "SDPA ms/token (after's run)",
                      "SEA ms/token, before", "SEA ms/token, after", "after / before"], rows)
    return rule


def before_after_model(prefix: str, runs: Labels, codes: Labels, column: str) -> Callable[[Results], str]:
    """`sea bench model` of two trees (``codes``), one after the other in each run: the prefill's peak
    memory and both speeds, ``{prefix}_{code}_{run}.json``; ``column`` heads the trees' column."""
    def rule(results: Results) -> str:
        rows = []
        for run_label, run in runs:
            for label, tag in codes:
                by = {(p["mode"], p["length"]): p for p in results.load(f"{prefix}_{tag}_{run}.json")["points"]}
                for length in sorted({n for _, n in by}):
                    dense, sea = by["dense", length], by["sea", length]
                    rows.append([run_label, label, f"{length:,}", num(dense["prefill_peak_mb"], 0),
                                 num(sea["prefill_peak_mb"], 0), num(sea["prefill_peak_mb"] / dense["prefill_peak_mb"]),
                                 num(sea["prefill_tok_s"] / dense["prefill_tok_s"]), num(dense["decode_tok_s"], 1),
                                 num(sea["decode_tok_s"], 1), num(sea["decode_tok_s"] / dense["decode_tok_s"])])
        return table(["run", column, "prompt tokens", "prefill peak MB dense", "prefill peak MB SEA", "SEA / dense",
                      "prefill SEA / dense", "decode dense tok/s", "decode SEA tok/s", "SEA / dense"], rows)
    return rule


def decode_step_profile(results: Results) -> str:
    """`benchmarks/decode_step_profile.py`: one layer's decoding step, the library functions by the CPU time of
    the operators they call (profiled), with their calls; the rest summed in the last row."""
    result = results.load("decode_step_profile.json")
    top, rest = result["rows"][:12], result["rows"][12:]
    rows = [[f"`{r['function']}`", num(r["us_per_step"], 0), num(r["ops_per_step"], 0)] for r in top]
    rows.append([f"{len(rest)} other functions", num(sum(r["us_per_step"] for r in rest), 0),
                 num(sum(r["ops_per_step"] for r in rest), 0)])
    return table([f"function (T={result['length']:,}; {num(result['ms_per_step'], 2)} ms per step unprofiled, "
                  f"{num(result['ops_per_step'], 0)} operator calls)", "us per step (profiled)", "operator calls"], rows)


def forced_keys_test(results: Results) -> str:
    """The undistilled patch under both rules on the reported text: wiki and BBC test perplexity on long
    windows (one run of each rule per cell, the dense of the after-run) and the suite's needles."""
    rows = []
    for text_name in ("wiki", "bbc"):
        for length in (4096, 8192):
            after = {r["name"]: r["perplexity"] for r in
                     results.load(f"eval_forced_after_test_{text_name}_{length}.json")["rows"]}
            before = results.load(f"ppl_forced_before_test_{text_name}_{length}.json")["perplexity"]
            rows.append([f"{text_name} test, {8192 // length} x {length:,} tokens", num(after["dense"]),
                         ppl_ratio(before, after["dense"]), ppl_ratio(after["sea"], after["dense"])])
    for length, dense_file, before_file, after_file in (
            (4096, "retrieval_needle4k_candidates1.json", "retrieval_needle4k_candidates1.json",
             "retrieval_forced_after_test_needle4k.json"),
            (8000, "retrieval_needle_8k.json", "retrieval_needle_8k_sea.json", "retrieval_forced_after_test_needle8k.json")):
        def found(name: str, method: str) -> str:
            result = results.load(name)
            row = next(r for r in retrieval_rows(result) if r["method"] == method)
            return answered(row)
        rows.append([f"needle in wiki/BBC test prose, {length:,} tokens", found(dense_file, "dense"),
                     found(before_file, "sea"), found(after_file, "sea")])
    return table(["SmolLM2-135M, undistilled patch, k=64", "dense", "SEA, forced bins (the default)",
                  "SEA, forced_keys=True"], rows)


TABLES: dict[str, Callable[[Results], str]] = {
    "summary": SUMMARY,
    "training-free-wiki": compare_table([
        ("dense", FREE, "dense"), ("oracle", FREE, "oracle"), ("oracle_head", FREE, "oracle_head"),
        ("window_sinks", FREE, "window_sinks"), ("quest", FREE, "quest"),
        ("**sea, undistilled, K=256 (default)**", K256["wiki"], "sea"),
        ("sea, undistilled, K=128", K128["wiki"], "sea"), ("sea, undistilled, K=512", K512["wiki"], "sea"),
        ("sea, paper's estimator, 35 x 512 steps", "compare_smollm2_sea_demo.json", "sea")]),
    "training-free-bbc": compare_table([
        ("dense", BBC, "dense"), ("oracle", BBC_ORACLE, "oracle"), ("window_sinks", (BBC, BBC_WINDOW), "window_sinks"),
        ("**sea, undistilled, K=256 (default)**", K256["bbc"], "sea"), ("sea, undistilled, K=128", K128["bbc"], "sea"),
        ("sea, undistilled, K=512", K512["bbc"], "sea")]),
    "validation-K": validation_k,
    "estimator-stages": grid(
        ["SEA estimator", "wiki test: k=32 / 64 / 128", "BBC test: k=32 / 64 / 128", "recall@64 wiki / BBC"],
        [[text("dense (reference)"), ppl(FREE, "dense"), ppl(BBC, "dense"), text("-")],
         [text("oracle (reference)"), ppl(FREE, "oracle"), ppl(BBC_ORACLE, "oracle"), text("-")],
         [text("window_sinks (reference)"), ppl(FREE, "window_sinks"), ppl((BBC, BBC_WINDOW), "window_sinks"),
          text("-")],
         [text("undistilled, K=128"), ppl(K128["wiki"]), ppl(K128["bbc"]), text("-")],
         [text("K=128, 120 row-subset steps"), ppl(ROWS120["wiki"]), ppl(ROWS120["bbc"]), text("-")],
         [text("undistilled, K=256 (default)"), ppl(K256["wiki"]), ppl(K256["bbc"]),
          lambda r: joined(recall(DIAG["undistilled, K=256"].format(t))(r) for t in ("wiki", "bbc"))],
         [text("K=256, 300 row-subset steps"), ppl(EST256["wiki"]), ppl(EST256["bbc"]),
          lambda r: joined(recall(DIAG["K=256, 300 steps"].format(t))(r) for t in ("wiki", "bbc"))],
         [text("undistilled, K=512"), ppl(K512["wiki"]), ppl(K512["bbc"]), text("-")],
         [text("**K=512, 500 row-subset steps**"), ppl(EST512["wiki"]), ppl(EST512["bbc"]),
          lambda r: joined(recall(DIAG["K=512, 500 steps"].format(t))(r) for t in ("wiki", "bbc"))],
         [text("paper's estimator, 35 x 512 steps"), ppl("compare_smollm2_sea_demo.json"), text("-"), text("-")]]),
    "distillation-runs": distill_runs,
    "quality-targets": quality_targets,
    "diagnose": diagnose,
    "demo": demo,
    "long-inputs": long_inputs,
    "passkey": passkey_table,
    "trained-baselines": compare_table([
        ("dense", "compare_smollm2_indexer.json", "dense"),
        ("indexer, 40 x 1024 steps", "compare_smollm2_indexer.json", "indexer"),
        ("sea, paper's estimator, 40 x 1024 steps", "compare_smollm2_sea_equal_budget.json", "sea"),
        ("sea, undistilled, K=128", K128["wiki"], "sea"),
        ("dense (BBC)", "compare_smollm2_indexer_bbc.json", "dense"),
        ("indexer, 40 x 1024 steps (BBC)", "compare_smollm2_indexer_bbc.json", "indexer")]),
    "full-kd": full_kd,
    "attention-paper-estimator": bench_table(["attention.json"],
                                             ["sdpa", "eager", "sea", "sea_block", "sea_reference"]),
    "attention-default-estimator": bench_table(["attention_default_estimator.json"], ["sdpa", "sea", "sea_block"]),
    "attention-K": bench_table([f"attention_K{w}.json" for w in (128, 256, 512)], ["sdpa", "sea", "sea_block"]),
    "attention-flex": bench_table(["attention_flex.json"], ["sdpa", "sea", "sea_flex"]),
    "attention-cost": bench_table(["attention_cost.json"], ["sdpa", "sea", "sea_chunked", "sea_block"]),
    "model-cost": model_cost_table((MODEL_COST_TINY, MODEL_COST_SMOLLM2)),
    "model-cost-growing": model_cost_table(MODEL_COST_GROWING),
    "decode-step": decode_step_table(DECODE_STEP, ("sdpa", "sea", "sea_block")),
    "attention-block-lists": bench_table(["attention_block_lists.json"],
                                         ["sdpa", "sea_chunked", "sea_block", "sea_block_chunked"]),
    "attention-block-breakdown": breakdown_table("attention_block_lists.json"),
    "attention-block-spans": bench_table(["attention_block_spans.json"], ["sdpa", "sea_block", "sea_block_chunked"]),
    "model-block-lists": model_cost_table(("model_cost_smollm2_growing_block.json", "model_smollm2_block_lists.json",
                                           "model_smollm2_block_spans.json")),
    "model-block-policy": model_cost_table(("model_smollm2_block_spans.json", "model_smollm2_block_dense_until_2048.json",
                                            "model_smollm2_block_dense_until_2048_f32.json")),
    "decode-step-block-keys": decode_step_table("decode_step_block_keys.json", ("sdpa", "sea", "sea_block")),
    "attention-bin-sums": bench_table(["attention_bin_sums_dtype.json"], ["sdpa", "sea_chunked", "sea_chunked_f32"]),
    "decode-step-bin-sums": decode_step_table("decode_step_bin_sums_dtype.json", ("sdpa", "sea", "sea_f32")),
    "model-bin-sums": model_cost_table(("model_smollm2_bin_sums_float64.json", "model_smollm2_bin_sums_float32.json")),
    "retrieval-candidates": retrieval_candidates,
    "refine-perplexity": refine_perplexity,
    "needle-4k": needle_4k,
    "needle-8k": needle_8k,
    "forced-budget": forced_budget,
    "forced-keys-validation": forced_keys_quality,
    "forced-sinks": forced_sinks,
    "forced-keys-test": forced_keys_test,
    "attention-forced-ab": attention_ab_table("attention_forced_ab.json"),
    "retrieval-mix": retrieval_mix,
    "residual-bins": residual_bins,
    "decoding-state-steps": before_after_steps("decode_step_state", STATE_RUNS, STATE_CODES),
    "decoding-state-model": before_after_model("model_smollm2_state", STATE_RUNS, STATE_CODES,
                                               "SEA's decoding state keeps"),
    "decoding-reads-steps": before_after_steps("decode_step_reads", READS_RUNS, READS_CODES),
    "decoding-reads-model": before_after_model("model_smollm2_reads", READS_RUNS, READS_CODES, "tree"),
    "decoding-reads-tiny": before_after_model("model_tiny_reads", READS_RUNS[:1], READS_CODES, "tree"),
    "decode-step-profile": decode_step_profile,
    "key-bounds": key_bounds,
    "dense-until-perplexity": dense_until_perplexity,
    "dense-layers-perplexity": dense_layers_perplexity,
    "dense-layers-needle": dense_layers_needle,
    "dense-layers-coverage": dense_layers_coverage,
    "candidates-4k": candidates_4k,
    "block-refined-perplexity": block_refined_perplexity,
    "block-refined-keys": compare_table([("sea, block grouping, candidates=4", "compare_block_cand4_1k.json", "sea")]),
    "block-refined-test": block_refined_test,
    "refine-short-rows": refine_short_rows,
    "refine-short-rows-retrieval": refine_short_rows_retrieval,
    "needle-diagnosis-block": needle_diagnosis("diagnose_needle4k_block_cand4_p7.json"),
    "long-rows-validation": long_rows_validation,
    "long-rows-test": long_rows_test,
    "long-rows-needle": needle_table(LONG_ROWS_NEEDLE, "SmolLM2-135M, undistilled patch, k=64"),
    "long-rows-needle-validation": needle_table(LONG_ROWS_NEEDLE_VALIDATION,
                                                "SmolLM2-135M, undistilled patch, k=64, wiki validation prose"),
    "attention-long-rows": bench_table(["attention_long_rows.json"],
                                       ["sdpa", "sea_chunked", "sea_long_rows_chunked", "sea_block_refined_chunked"]),
    "model-long-rows": model_cost_table(("model_smollm2_long_rows_off.json", "model_smollm2_long_rows.json")),
    "long-rows-copy": long_rows_copy,
    "default-long-needle": default_long_needle,
    "demo-long": demo_long,
    "quality-recipe-long": quality_recipe_long,
    "quality-recipe-continued": quality_recipe_continued,
    "quality-recipe-needle-4k": needle_table((
        ("dense (not SEA)", "retrieval_k512_needle_4k.json", "dense"),
        ("the default, undistilled", "retrieval_needle_default_4k_8k.json", "sea"),
        ("the default, the model `sea demo` distils", "retrieval_needle_4k_demo_default.json", "sea"),
        ("the default, the quality recipe (K=512, 500 row-subset steps)", "retrieval_k512_needle_4k.json", "sea")),
        "SmolLM2-135M, k=64, the suite's needle in test prose", (4096,)),
    "default-passkey": default_passkey,
    "distill-windows": distill_windows,
    "levers-4k": levers_4k,
    "top-p-oracle-4k": top_p_oracle_4k,
    "copy-margins-default": needle_margins("diagnose_copy_2k_default_p0.json"),
    "fresher-copy-2k": fresher_copy_2k,
    "query-block-cost": query_block_cost,
    "demo-needle-4k": needle_table((("dense (not SEA)", "retrieval_needle_4k_demo_default.json", "dense"),
                                    ("the default, undistilled", "retrieval_needle_default_4k_8k.json", "sea"),
                                    ("the default, the model `sea demo` distils (512-token windows)",
                                     "retrieval_needle_4k_demo_default.json", "sea")),
                                   "SmolLM2-135M, k=64, the suite's needle in test prose", (4096,)),
    "needle-diagnosis-default": needle_diagnosis("diagnose_needle4k_default_p2.json"),
    "needle-margins-default": needle_margins("diagnose_needle4k_default_p2.json"),
    "needle-margins-default-p6": needle_margins("diagnose_needle4k_default_p6.json"),
    "attention-default-long-rows": bench_table(["attention_default_long_rows.json"],
                                               ["sdpa", "sea_chunked", "sea_per_query_chunked"]),
    "default-long-rows-breakdown": breakdown_table("breakdown_default_16k.json"),
    "model-default-long-rows": model_cost_table(("model_smollm2_default_long_rows.json",)),
    "attention-long-rows-c16": bench_table(["attention_long_rows_c16.json"],
                                           ["sdpa", "sea_chunked", "sea_long_rows_chunked", "sea_long_rows_c16_chunked",
                                            "sea_block_refined_chunked"]),
    "model-long-rows-c16": model_cost_table(("model_smollm2_long_rows_c16_default.json",
                                             "model_smollm2_long_rows_c16.json")),
    "attention-block-refined": bench_table(["attention_block_refined.json"],
                                           ["sdpa", "sea_chunked", "sea_block_chunked", "sea_block_refined_chunked"]),
    "attention-block-buckets": bench_table(["attention_block_refined_buckets.json"],
                                           ["sdpa", "sea_block_chunked", "sea_block_refined_chunked"]),
    "model-block-buckets": model_cost_table(("model_smollm2_block_refined_buckets.json",)),
    "attention-block-refined-lists": bench_table(["attention_block_refined_lists.json"],
                                                 ["sdpa", "sea_chunked", "sea_block_chunked", "sea_block_refined_chunked"]),
    "model-block-refined-lists": model_cost_table(("model_smollm2_block_refined_lists.json",)),
    "model-block-refined": model_cost_table(("model_smollm2_block_refined.json", "model_smollm2_block_refined_policy.json",
                                             "model_tiny_block_refined.json")),
    "model-dense-until": model_cost_table(("model_smollm2_policy_off.json", "model_smollm2_dense_until_2048.json",
                                           "model_smollm2_dense_until_2048_decode64.json")),
    "needle-bin-ranks": needle_bin_ranks,
    "model-bench": model_bench,
    "decode-latency": decode_latency,
    "distill-throughput": distill_throughput,
    "grouping-quality": grouping_quality,
    "grouping-quality-4k": grouping_quality_4k,
    "edge-dots-ways": edge_dots_ways,
    "attention-default-trimmed-ab": attention_ab_table("attention_default_trimmed_ab.json"),
    "attention-default-trimmed": bench_table(["attention_default_trimmed.json"],
                                             ["sdpa", "sea_chunked", "sea_block_chunked"]),
    "model-default-trimmed": model_cost_table(("model_smollm2_policy_off.json", "model_smollm2_default_trimmed.json")),
    "model-tiny-trimmed": model_cost_table(("model_tiny_default_trimmed.json", "model_tiny_block_trimmed.json")),
    "model-block-policy-trimmed": model_cost_table(("model_smollm2_block_policy_trimmed.json",
                                                    "model_smollm2_block_policy_trimmed_8k_b.json")),
    "attention-intel-xeon": bench_table(["attention_intel_xeon.json"], ["sdpa", "sea_chunked", "sea_block_chunked"]),
    "model-intel-xeon": model_cost_table(("model_smollm2_intel_xeon.json", "model_smollm2_intel_xeon_block_policy.json")),
    "encoder-tests": encoder_tests,
    "encoder-validation": encoder_validation,
}
