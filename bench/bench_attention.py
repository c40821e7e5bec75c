"""Attention throughput: each backend against F.scaled_dot_product_attention, forward and forward+backward.

FLOPs per call follow FlashAttention's convention: causal forward 2*B*H*T^2*D (half of the full 4*B*H*T^2*D),
backward 2.5x the forward."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.common import DEVICE, compiled, skip_unless_runnable
from kernels import reference
from kernels.testing import attention_inputs, check_against_reference

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


def validation(backend, attend, q, k, v, p, backward):
    """Checks one batch element and two heads of the case against the float64 reference (the same kernels and
    configs run; a float64 (B, H, T, T) of the whole case would not fit). triton and ext draw the dropout mask that
    kernels.reference specifies, so they are checked with dropout; torch and eager draw masks of their own, so their
    math is checked at p = 0."""
    p = p if backend in ("triton", "ext") else 0.0

    def expected(q, k, v):
        mask = None
        if p > 0.0:
            seed = int(reference.new_dropout_seed(q.device))
            mask = reference.dropout_keep_mask(seed, *q.shape[:3], k.shape[2], p, q.device)
        return reference.attention(q, k, v, True, p, dropout_mask=mask)

    inputs = tuple(t[:1, :2] for t in (q, k, v))
    return lambda: check_against_reference(lambda q, k, v: attend(q, k, v, p), expected, inputs, DTYPE,
                                           f"attention {backend} p={p}", backward=backward)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape,backend", CASES, ids=[f"{'x'.join(map(str, s))}-{b}" for s, b in CASES])
def test_attention(timed, shape, backend, mode):
    skip_unless_runnable(backend)
    b, h, t, d, p = shape
    q, k, v = attention_inputs(b, h, t, t, d, DEVICE, DTYPE, seed=0, requires_grad=mode != "fwd")  # nanoGPT's layout
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
    timed(fn, f"attention {mode} {info['shape']} {info['dtype']}", backend, info, {"flop": flop},
          validation(backend, attend, q, k, v, p, backward=mode != "fwd"))
