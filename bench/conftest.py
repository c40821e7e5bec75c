"""Shared benchmark machinery: a `timed` fixture that times one case, records its throughput, and its speed
ratio to the torch baseline measured earlier in the same run (cases are ordered baseline first)."""

import os

import pytest
import torch

from bench.common import DEVICE

_baseline_seconds = {}  # case key -> median seconds of the torch baseline in this run


@pytest.fixture
def timed(benchmark):
    """timed(fn, key, backend, info, work) benchmarks fn (synchronising CUDA inside the timed call).

    key names the case (op, mode, shape, dtype) so a backend can be compared with the torch baseline of the same
    key; work is {"flop": n} or {"bytes": n} per call and becomes TFLOP/s or GB/s in extra_info."""

    def run(fn, key, backend, info, work):
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
        if backend == "torch":
            _baseline_seconds[key] = seconds
        elif key in _baseline_seconds:
            benchmark.extra_info["ratio_to_torch"] = round(_baseline_seconds[key] / seconds, 3)

    return run
