"""Helpers the benchmark files share."""

import functools

import pytest
import torch

from kernels.backends import unavailable_reason
from kernels.runtime import triton_interpreted

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
