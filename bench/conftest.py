"""Shared benchmark machinery: a `timed` fixture that times one case, records its throughput, and its speed-up
over the baseline measured earlier in the same run (cases are ordered baseline first)."""

import os

import pytest
import torch

from bench.common import DEVICE

_baseline_seconds = {}  # case key -> median seconds of the baseline in this run


@pytest.fixture
def timed(benchmark):
    """timed(fn, key, backend, info, work, baseline) benchmarks fn (synchronising CUDA inside the timed call).

    key names the case (op, mode, shape, dtype) so a backend can be compared with the baseline backend (torch's
    own op unless told otherwise) of the same key; work is {"flop": n}, {"bytes": n} or {"tokens": n} per call and
    becomes TFLOP/s, GB/s or tokens/s in extra_info."""

    def run(fn, key, backend, info, work, baseline="torch"):
        def step():
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        for _ in range(2):  # warm-up: autotuning, JIT compilation, allocator
            step()
        benchmark.group = key
        benchmark.extra_info.update(info, backend=backend, torch=torch.__version__, device=torch.cuda.get_device_name()
                                    if DEVICE == "cuda" else f"cpu ({os.cpu_count()} cores)")
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
