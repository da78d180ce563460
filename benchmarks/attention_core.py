"""Issue benchmark: SEA (sparse path), SEA (reference path) and PyTorch SDPA, forward only.

B=1, H=12, d=64, k=64, K=128, causal, fp32, on this machine's CPU threads. Each point runs
in its own process (peak memory is per point). Usage:

    .venv/bin/python benchmarks/attention_core.py --lengths 1024,4096,16384 --json benchmarks/results/attention_core.json
"""

import argparse

from sea_attention.bench import AttentionBenchSetup, bench_attention, format_attention_table, write_bench_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/attention_core.json")
    args = parser.parse_args()
    setup = AttentionBenchSetup(repeats=args.repeats)
    lengths = [int(x) for x in args.lengths.split(",")]
    points = bench_attention(lengths, setup=setup)
    print()
    print(format_attention_table(points))
    write_bench_json(points, args.json, setup=setup.__dict__)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
