"""Helpers the benchmark files share."""

import functools
import os
from pathlib import Path

import pytest
import torch

from chargpt_kernels.backends import unavailable_reason
from chargpt_kernels.runtime import triton_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_unless_runnable(backend):
    """Skip a backend that cannot run here, and anything that would only be interpreted: we never time that."""
    if backend in ("torch", "torch.compile"):
        if backend == "torch.compile" and DEVICE != "cuda":
            pytest.skip("torch.compile baseline is benchmarked on CUDA only")
        return
    reason = unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    if backend == "triton" and (DEVICE != "cuda" or triton_interpreted()):
        pytest.skip("Triton is only timed on a GPU, never under the interpreter")


@functools.cache
def compiled(fn):
    """torch.compile of `fn`, built once per process: the `torch.compile` baseline of the eager reference."""
    return torch.compile(fn)


def checks_weight_grads(backend, dtype) -> bool:
    """Whether a benchmark's check holds `backend`'s LayerNorm weight and bias gradients to the float64 reference.

    Not for torch's own CPU LayerNorm in bfloat16/float16: its dweight and dbias drift from the float64 sums as rows
    grow (torch 2.14.1, this machine, N = 384, largest error over largest value: bf16 1% at 64 rows, 3% at 1024, 12-13%
    at 16384; fp16 0.1%, 0.5%, 1.6%), past the 16-bit tolerance, as a sum kept in 16 bits would. As the baseline it is
    timed all the same (it is what a model pays); its output and its input gradients are still checked."""
    return not (backend == "torch" and DEVICE == "cpu" and dtype in (torch.bfloat16, torch.float16))


def cpu_name() -> str:
    """The CPU model and core count, as results must name the machine (CPU models differ between machines here)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    return f"{model} ({os.cpu_count()} cores)"
