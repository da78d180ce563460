"""Benchmarks behind `sea bench`: the attention alone (time, memory, per-stage breakdown), one
layer's decoding latency, and whole models (prefill and decode speed, dense against SEA).

    points = bench_attention([1024, 4096], methods=("sdpa", "sea"))
    print(format_attention_table(points))
"""

from .attention import (
    DEFAULT_METHODS, METHODS, AttentionBenchPoint, AttentionBenchSetup, add_speedups, bench_attention, check_methods, estimated_gb,
    format_attention_table,
)
from .decode import (
    DECODE_METHODS, DEFAULT_DECODE_METHODS, DecodeBenchPoint, bench_decode, check_decode_methods, format_decode_table,
)
from .breakdown import STAGES, StageBreakdown, StageTime, bench_breakdown, format_breakdown, stage_flops
from .model import CACHES, ModelBenchPoint, ModelBenchSetup, bench_model, format_model_table, prompt_tokens, tiny_model
from .plot import plot_attention_bench, plot_model_bench
from .runtime import machine_info, write_bench_json

__all__ = [
    "CACHES", "DECODE_METHODS", "DEFAULT_DECODE_METHODS", "DEFAULT_METHODS", "METHODS", "STAGES", "DecodeBenchPoint",
    "bench_decode", "check_decode_methods", "format_decode_table", "AttentionBenchPoint", "AttentionBenchSetup", "ModelBenchPoint", "ModelBenchSetup",
    "StageBreakdown", "StageTime", "add_speedups", "bench_attention", "bench_breakdown", "bench_model",
    "check_methods", "estimated_gb", "format_attention_table", "format_breakdown", "format_model_table",
    "machine_info", "plot_attention_bench", "plot_model_bench", "prompt_tokens", "stage_flops", "tiny_model", "write_bench_json",
]
