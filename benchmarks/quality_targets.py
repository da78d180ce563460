"""Issue 10's quality targets, checked against saved `sea compare` and `sea diagnose` JSONs.

    python benchmarks/quality_targets.py \
        --sea benchmarks/results/compare_smollm2_sea_K512_rows128x4_500x1024_{wiki,bbc}.json \
              benchmarks/results/compare_smollm2_sea_K512_rows128x4_500x1024_4096_{wiki,bbc}.json \
              benchmarks/results/diagnose_smollm2_K512_rows128x4_500x1024_{wiki,bbc}.json \
        --reference benchmarks/results/compare_smollm2_training_free.json \
              benchmarks/results/compare_smollm2_bbc_oracle_sea.json \
              benchmarks/results/compare_smollm2_bbc_k64.json \
              benchmarks/results/compare_smollm2_bbc_window_sinks_k32_128.json \
              benchmarks/results/compare_smollm2_4096_k64_K256.json \
              benchmarks/results/compare_smollm2_bbc_4096_k64_K256.json \
        --json benchmarks/results/quality_targets_K512.json

`--sea` holds the files of the one SEA model being judged (its `sea` rows and its diagnosis);
`--reference` the training-free rows (dense, oracle, window_sinks), which do not depend on the
estimator, so they may come from any run on the same windows. Rows are keyed by (text, window
length, method, k); two files that disagree on a row are refused. Prints one line per target
and text (measured, bound, met or missed) and writes them to a JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sea_attention.atomic import write_text

Key = tuple[str, int, str, int | None]  # (text, seq_len, method, k)


def load_rows(paths: list[str], methods: set[str]) -> dict[Key, float]:
    """Perplexity per (text, seq_len, method, k) of the given methods, from compare JSONs."""
    rows: dict[Key, float] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        if "points" not in result:
            continue
        for point in result["points"]:
            if point["method"] not in methods:
                continue
            key = (result["data"], result["setup"]["seq_len"], point["method"], point["k"])
            if key in rows and abs(rows[key] - point["perplexity"]) > 1e-3 * rows[key]:
                raise ValueError(f"{path}: {key} has perplexity {point['perplexity']:.3f}, "
                                 f"another file {rows[key]:.3f}; pass files of one set of windows")
            rows[key] = point["perplexity"]
    return rows


def load_recall(paths: list[str]) -> dict[str, float]:
    """Recall of the oracle's covered mass (mean over layers) per text, from diagnose JSONs."""
    return {result["data"]: result["summary"]["recall"]
            for result in (json.loads(Path(p).read_text()) for p in paths) if "summary" in result}


def targets(rows: dict[Key, float], recall: dict[str, float]) -> list[dict]:
    """Every target the rows allow: (name, text, measured, bound, met)."""
    checks = []

    def check(name: str, text: str, measured: float, bound: float, below: bool = True) -> None:
        met = measured <= bound if below else measured >= bound
        checks.append({"target": name, "text": text, "measured": measured, "bound": bound, "met": met})

    for text in sorted({key[0] for key in rows}):
        get = lambda seq, method, k: rows.get((text, seq, method, k))  # noqa: E731
        if get(1024, "sea", 64) and get(1024, "oracle", 64):
            check("SEA@64 / oracle@64 (1024)", text, get(1024, "sea", 64) / get(1024, "oracle", 64), 1.05)
        if get(1024, "sea", 128) and get(1024, "dense", None):
            check("SEA@128 / dense (1024)", text, get(1024, "sea", 128) / get(1024, "dense", None), 1.03)
        for seq, method, k in sorted(key[1:] for key in rows if key[0] == text and key[2] == "sea"):
            if get(seq, "window_sinks", k):
                check(f"SEA@{k} / window_sinks@{k} ({seq})", text,
                      get(seq, "sea", k) / get(seq, "window_sinks", k), 1.0)
        if text in recall:
            check("recall@64 of the oracle's mass", text, recall[text], 0.95, below=False)
    return checks


def collect_checks(sea: list[str], reference: list[str]) -> list[dict]:
    """The targets of one SEA model: its `sea` rows and diagnosis from ``sea``, the training-free
    rows (dense, oracle, window_sinks) from ``reference`` and ``sea`` together."""
    rows = load_rows(sea, {"sea", "dense"})
    rows.update(load_rows(reference + sea, {"dense", "oracle", "window_sinks"}))
    return targets(rows, load_recall(sea))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sea", nargs="+", required=True, help="compare/diagnose JSONs of the SEA model")
    parser.add_argument("--reference", nargs="+", default=[], help="compare JSONs with dense/oracle/window rows")
    parser.add_argument("--json", help="write the checks here")
    args = parser.parse_args()
    checks = collect_checks(args.sea, args.reference)
    print(f"{'target':38s} {'text':6s} {'measured':>9s} {'bound':>6s}  result")
    for c in checks:
        print(f"{c['target']:38s} {c['text']:6s} {c['measured']:9.3f} {c['bound']:6.2f}  "
              f"{'met' if c['met'] else 'MISSED'}")
    if args.json:
        write_text(args.json, json.dumps({"sea": args.sea, "reference": args.reference,
                                          "checks": checks}, indent=1) + "\n")


if __name__ == "__main__":
    main()
