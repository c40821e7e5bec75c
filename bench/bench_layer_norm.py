"""LayerNorm throughput: each backend against F.layer_norm, forward and forward+backward.

Bytes per call count the compulsory traffic: forward reads x and writes y; backward reads x and dy and writes
dx (weights and the per-row statistics are small next to them)."""

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from bench.common import DEVICE, checks_weight_grads, compiled, skip_unless_runnable
from chargpt_kernels import reference
from chargpt_kernels.testing import check_against_reference, layer_norm_inputs

# (rows, N, dtype)
if DEVICE == "cuda":
    SHAPES = [(16384, 384, torch.bfloat16), (16384, 384, torch.float32), (4096, 1024, torch.bfloat16),
              (4096, 4096, torch.bfloat16), (2048, 16384, torch.bfloat16)]
    BACKENDS = ("torch", "torch.compile", "triton", "ext")
else:
    SHAPES = [(768, 128, torch.float32), (16384, 384, torch.float32), (16384, 384, torch.bfloat16)]
    BACKENDS = ("torch", "eager", "ext")
# The baseline runs first for each shape; eager (torch's composed math in the input dtype) in float32 only.
CASES = [(shape, backend) for shape in SHAPES for backend in BACKENDS
         if backend != "eager" or shape[2] == torch.float32]


def layer_norm_fn(backend):
    if backend == "torch":
        return lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)
    if backend == "torch.compile":
        return lambda x, w, b: compiled(reference.layer_norm)(x, w, b)
    return lambda x, w, b: chargpt_kernels.layer_norm(x, x.shape[-1:], w, b, backend=backend)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape,backend", CASES,
                         ids=[f"{m}x{n}-{str(dt)[6:]}-{b}" for (m, n, dt), b in CASES])
def test_layer_norm(timed, shape, backend, mode):
    skip_unless_runnable(backend)
    rows, n, dtype = shape
    x, w, b = layer_norm_inputs((rows,), n, DEVICE, dtype, True, True, seed=0, requires_grad=mode != "fwd")
    grad = torch.randn(rows, n, device=DEVICE, dtype=dtype)
    norm = layer_norm_fn(backend)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                norm(x, w, b)
    else:
        def fn():
            torch.autograd.grad(norm(x, w, b), (x, w, b), grad)
    moved = rows * n * x.element_size() * (2 if mode == "fwd" else 5)
    info = dict(op="layer_norm", mode=mode, shape=f"{rows}x{n}", dtype=str(dtype).removeprefix("torch."))

    def check():
        params = (w, b) if checks_weight_grads(backend, dtype) else (w.detach(), b.detach())
        check_against_reference(norm, reference.layer_norm, (x, *params), dtype, f"layer_norm {backend}",
                                backward=mode != "fwd")

    timed(fn, f"layer_norm {mode} {info['shape']} {info['dtype']}", backend, info, {"bytes": moved}, check)
