"""Where one SEA layer's decoding step spends its time: the operator calls of each library function.

A layer shaped like SmolLM2-135M's (9 query heads, 3 kv heads, d=64, k=64, the default config) prefills
``--length`` random keys, then decodes ``--steps`` single-token steps under ``torch.profiler``. Every
operator called from Python (not from inside another operator) is charged to the innermost
``sea_attention`` function on its stack; the table lists the functions by CPU time per step, with their
operator calls per step. The profiler adds its own cost to every call, so the times are inflated
alike; the counts are exact. It shows why the step costs what it does: many small operations, none
dominant (docs/results.md, "Decoding reads less per step").

    PYTHONPATH=src python benchmarks/decode_step_profile.py --length 8192 --steps 64 --threads 1 \
        --json benchmarks/results/decode_step_profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.atomic import write_text
from sea_attention.tools.bench.runtime import machine_info

PACKAGE = "sea_attention/"


def _owner(event) -> str:
    """The innermost library function on an operator's Python stack ('outside' when there is none)."""
    parent = event.cpu_parent
    while parent is not None:
        if PACKAGE in parent.name:
            return parent.name.split(PACKAGE, 1)[1]
        parent = parent.cpu_parent
    return "outside"


def charged(events) -> dict[str, list[float]]:
    """{function: [CPU microseconds, operator calls]} of the operators called from Python."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        entry = totals[_owner(event)]
        entry[0] += event.cpu_time_total
        entry[1] += 1
    return totals


@torch.no_grad()
def profile_steps(length: int, steps: int) -> tuple[float, dict[str, list[float]]]:
    """Milliseconds per step without the profiler, and the profiled steps' charges."""
    torch.manual_seed(0)
    layer = SEAAttention(SEAConfig(num_heads=9, num_kv_heads=3, head_dim=64, k=64)).eval()
    total = length + 2 * steps + 8
    q, k, v = (torch.randn(1, heads, total, 64) for heads in (9, 3, 3))
    state = DecodeState()

    def step(t: int) -> None:
        layer.context_only(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], state=state)

    layer.context_only(q[:, :, :length], k[:, :, :length], v[:, :, :length], state=state)
    for t in range(length, length + 8):  # warm-up
        step(t)
    start = time.perf_counter()
    for t in range(length + 8, length + 8 + steps):
        step(t)
    plain_ms = (time.perf_counter() - start) / steps * 1e3
    with torch.profiler.profile(with_stack=True) as prof:
        for t in range(length + 8 + steps, length + 8 + 2 * steps):
            step(t)
    return plain_ms, charged(prof.events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens before the decoded steps")
    parser.add_argument("--steps", type=int, default=64, help="decoded steps timed, then as many profiled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15, help="functions printed")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain_ms, totals = profile_steps(args.length, args.steps)
    rows = sorted(({"function": name, "us_per_step": us / args.steps, "ops_per_step": calls / args.steps}
                   for name, (us, calls) in totals.items()), key=lambda r: -r["us_per_step"])
    ops = sum(r["ops_per_step"] for r in rows)
    print(f"T={args.length}: {plain_ms:.2f} ms per step without the profiler; {ops:.0f} operator calls per step")
    for row in rows[:args.top]:
        print(f"{row['us_per_step']:8.1f} us {row['ops_per_step']:6.1f} calls  {row['function']}")
    if args.json:
        payload = {"machine": machine_info(args.threads), "length": args.length, "steps": args.steps,
                   "ms_per_step": plain_ms, "ops_per_step": ops, "rows": rows}
        write_text(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
