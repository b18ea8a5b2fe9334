"""pytest-benchmark suite of the ops on the CPU (float32, B=1, H=8, d=64, causal).

    pytest bench/bench_ops_cpu.py --benchmark-enable --benchmark-only \
        --benchmark-storage=bench/results/pytest-benchmark --benchmark-save=cpu_ops
    pytest bench/bench_ops_cpu.py --benchmark-enable --benchmark-only \
        --benchmark-storage=bench/results/pytest-benchmark --benchmark-compare

Each case records its throughput and, for the attention cases, the ratio to SDPA timed
in the same process (extra_info), so the saved JSON carries the numbers the README quotes.
"""

import pytest
import torch

from mka.benchmark import Shape, attention_flops, median_ms, op_callables

SHAPES = {"T1024": Shape(B=1, T=1024, H=8, G=8, d=64), "T1024-gqa4": Shape(B=1, T=1024, H=8, G=2, d=64)}
OPS = ["mka.attention", "mka.fastmka", "mka.mka", "sdpa"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", OPS)
def test_cpu_op(benchmark, op, pass_, shape):
    s = SHAPES[shape]
    calls = op_callables(s, "cpu", torch.float32, backward=pass_ == "fwd+bwd")
    benchmark.pedantic(calls[op], rounds=5, warmup_rounds=1)
    flops = attention_flops(s.B, s.H, s.T, s.T, s.d, s.causal) * (3.5 if pass_ != "fwd" else 1)
    med = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = flops / med / 1e9
    if op == "mka.attention":  # SDPA side by side, same process and inputs' shape
        sdpa_ms = median_ms(calls["sdpa"], "cpu", warmup=1, reps=5)
        benchmark.extra_info["throughput_vs_sdpa"] = sdpa_ms / (med * 1e3)


@pytest.mark.parametrize("op", ["mka.attention", "sdpa"])
def test_cpu_call_overhead(benchmark, op):
    """Per-call cost on tiny inputs: the custom-op dispatch + validation + native call."""
    calls = op_callables(Shape(B=1, T=4, H=1, G=1, d=16), "cpu", torch.float32, backward=False)
    benchmark(calls[op])
