"""Attention throughput: each backend against F.scaled_dot_product_attention, forward and forward+backward.

FLOPs per call follow FlashAttention's convention: causal forward 2*B*H*T^2*D (half of the full 4*B*H*T^2*D),
backward 2.5x the forward."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from bench.common import DEVICE, compiled, skip_unless_runnable

# (B, H, T, D, dropout_p)
if DEVICE == "cuda":
    DTYPE = torch.bfloat16
    SHAPES = [(64, 6, 256, 64, 0.0)] + [(16384 // t, 2048 // d, t, d, 0.0)
                                        for d in (64, 128) for t in (1024, 2048, 4096, 8192)]
    BACKENDS = ("torch", "torch.compile", "triton", "ext")
else:
    DTYPE = torch.float32
    SHAPES = [(12, 4, 64, 32, 0.0), (16, 6, 256, 64, 0.0), (12, 4, 64, 32, 0.2), (16, 6, 256, 64, 0.2)]
    BACKENDS = ("torch", "eager", "ext")
CASES = [(shape, backend) for shape in SHAPES for backend in BACKENDS]  # the baseline runs first for each shape


def attention_fn(backend):
    if backend == "torch":
        return lambda q, k, v, p: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    if backend == "torch.compile":
        return lambda q, k, v, p: compiled(reference.attention)(q, k, v, True, p)
    return lambda q, k, v, p: kernels.causal_attention(q, k, v, dropout_p=p, backend=backend)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape,backend", CASES, ids=[f"{'x'.join(map(str, s))}-{b}" for s, b in CASES])
def test_attention(timed, shape, backend, mode):
    skip_unless_runnable(backend)
    b, h, t, d, p = shape
    # nanoGPT's layout: (B, T, H, D) storage seen as (B, H, T, D) views.
    q, k, v = (torch.randn(b, t, h, d, device=DEVICE, dtype=DTYPE).transpose(1, 2).requires_grad_(mode != "fwd")
               for _ in range(3))
    grad = torch.randn(b, h, t, d, device=DEVICE, dtype=DTYPE)
    attend = attention_fn(backend)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                attend(q, k, v, p)
    else:
        def fn():
            torch.autograd.grad(attend(q, k, v, p), (q, k, v), grad)
    flop = 2 * b * h * t * t * d * (1 if mode == "fwd" else 3.5)
    info = dict(op="attention", mode=mode, shape=f"B={b} H={h} T={t} D={d}" + (f" p={p}" if p else ""),
                dtype=str(DTYPE).removeprefix("torch."))
    timed(fn, f"attention {mode} {info['shape']} {info['dtype']}", backend, info, {"flop": flop})
