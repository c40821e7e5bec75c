"""Shared benchmark machinery: a `timed` fixture that validates one case against the float64 reference, then times
it, records its throughput, and its speed-up over the baseline measured earlier in the same run (cases are ordered
baseline first). Validation runs even with --benchmark-disable, so CI checks every row that could be reported."""


import pytest
import torch

from bench.common import DEVICE, cpu_name

_baseline_seconds = {}  # case key -> median seconds of the baseline in this run
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100/H200: 50 MB; B200: 126 MB)
FLUSHED_ROUNDS = 50


@pytest.fixture
def timed(benchmark):
    """timed(fn, key, backend, info, work, check, baseline) validates, then benchmarks fn (synchronising CUDA inside
    the timed call).

    check() runs the case once and asserts its result against chargpt_kernels.reference (chargpt_kernels.testing); it
    runs before any timing, so no row reports a speed-up for a wrong answer. key names the case (op, mode, shape, dtype)
    so a backend can be compared with the baseline backend (torch's own op unless told otherwise) of the same key; work
    is {"flop": n}, {"bytes": n} or {"tokens": n} per call and becomes TFLOP/s, GB/s or tokens/s in extra_info.
    Bandwidth cases on CUDA flush L2 before each repetition, so GB/s counts DRAM traffic, not cache hits."""

    def run(fn, key, backend, info, work, check, baseline="torch"):
        check()

        def step():
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        for _ in range(2):  # warm-up: autotuning, JIT compilation, allocator
            step()
        benchmark.group = key
        benchmark.extra_info.update(info, backend=backend, torch=torch.__version__, device=torch.cuda.get_device_name()
                                    if DEVICE == "cuda" else cpu_name())
        if DEVICE == "cuda" and "bytes" in work and not benchmark.disabled:
            scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)

            def flush_l2():
                scratch.zero_()
                torch.cuda.synchronize()

            benchmark.pedantic(step, setup=flush_l2, rounds=FLUSHED_ROUNDS, warmup_rounds=1)
        else:
            benchmark(step)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        seconds = benchmark.stats.stats.median
        if "flop" in work:
            benchmark.extra_info["tflops"] = round(work["flop"] / seconds / 1e12, 3)
        if "bytes" in work:
            benchmark.extra_info["gbps"] = round(work["bytes"] / seconds / 1e9, 2)
        if "tokens" in work:
            benchmark.extra_info["tokens_per_sec"] = round(work["tokens"] / seconds)
        benchmark.extra_info["baseline"] = baseline
        if backend == baseline:
            _baseline_seconds[key] = seconds
        elif key in _baseline_seconds:
            benchmark.extra_info["speedup"] = round(_baseline_seconds[key] / seconds, 3)

    return run
