"""EXPERIMENT (issue 25): summarise `sea diagnose --task` JSONs: where does SEA lose the dense top key?

For every (answer step, layer, head) where the dense top-1 key is not a forced (sink / window) key
and the dense top keys hold at least ``--mass`` of the probability, classify the top-1 key:

* ``estimate_ok``: SEA selects it;
* ``signal``: the estimate ranks it outside the budget, exact bin mass would rank it inside (c/e: the
  estimate's signal loses it);
* ``budget``: even exact bin mass ranks it outside the grouped budget (d: the shared budget);
* ``head_budget``: of ``budget``, those whose exact-mass rank in their own head is within k/bin-size
  bins (a per-head budget would have taken it).

    PYTHONPATH=src python benchmarks/retrieval_diagnose_summary.py benchmarks/results/diagnose_needle_1k_p*.json
"""

from __future__ import annotations

import argparse
import json


def classify(payload: dict, mass: float) -> dict[str, int]:
    counts = {"pairs": 0, "estimate_ok": 0, "signal": 0, "budget": 0, "head_budget": 0}
    window = payload["length"] - 20  # top-1 keys past here (or among the first 8) sit in forced bins
    for layer in payload["layers"].values():
        for step in range(payload["steps"]):
            for head, top_mass in enumerate(layer["top_mass"][step]):
                key = layer.get("top1_key", [[window // 2] * 9] * payload["steps"])[step][head]
                if top_mass < mass or key < 8 or key >= window:
                    continue
                budget = layer["budget"][step][head]
                rank, exact = layer["group_rank"][step][head], layer["mass_group_rank"][step][head]
                chosen = layer["top1_selected"][step][head] > 0 if "top1_selected" in layer else rank < budget
                counts["pairs"] += 1
                if chosen:
                    counts["estimate_ok"] += 1
                elif exact < budget:
                    counts["signal"] += 1
                else:
                    counts["budget"] += 1
                    counts["head_budget"] += int(layer["mass_head_rank"][step][head] < budget / 9)  # 9 heads
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--mass", type=float, default=0.3, help="least dense top-key mass of a counted pair")
    args = parser.parse_args()
    for name in args.files:
        payload = json.load(open(name))
        ok = payload["answer"] in payload["sea_answer"]
        counts = classify(payload, args.mass)
        mean = [sum(row) / len(row) for row in zip(*(
            [sum(h) / len(h) for h in layer["selected_mass"]] for layer in payload["layers"].values()))]
        print(f"{name}: answer {payload['answer']} dense {payload['dense_answer']!r} SEA {payload['sea_answer']!r} "
              f"({'right' if ok else 'wrong'}); selected top mass per step {[round(m, 3) for m in mean]}; {counts}")


if __name__ == "__main__":
    main()
