"""Attention throughput: each backend against F.scaled_dot_product_attention, forward and forward+backward.

FLOPs per call follow FlashAttention's convention: causal forward 2*B*H*T^2*D (half of the full 4*B*H*T^2*D),
backward 2.5x the forward."""

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from bench.common import DEVICE, compiled, skip_unless_runnable
from chargpt_kernels import reference
from chargpt_kernels.testing import attention_inputs, check_against_reference

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
# (shape, backend, dtype); the baseline runs first for each shape. On CPU also bfloat16 (AMX / AVX512-BF16 GEMMs in
# both torch and ext), against torch only: eager's composed bf16 math is not a baseline anyone uses.
CASES = [(shape, backend, DTYPE) for shape in SHAPES for backend in BACKENDS]
if DEVICE == "cpu":
    CASES += [(shape, backend, torch.bfloat16) for shape in SHAPES[1::2] for backend in ("torch", "ext")]


def attention_fn(backend):
    if backend == "torch":
        return lambda q, k, v, p: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    if backend == "torch.compile":
        return lambda q, k, v, p: compiled(reference.attention)(q, k, v, True, p)
    return lambda q, k, v, p: chargpt_kernels.causal_attention(q, k, v, dropout_p=p, backend=backend)


def validation(backend, attend, q, k, v, p, backward):
    """Checks one batch element and two heads of the case against the float64 reference (the same kernels and
    configs run; a float64 (B, H, T, T) of the whole case would not fit). triton and ext draw the dropout mask that
    chargpt_kernels.reference specifies, so they are checked with dropout; torch and eager draw masks of their own, so
    their math is checked at p = 0."""
    p = p if backend in ("triton", "ext") else 0.0

    def expected(q, k, v):
        mask = None
        if p > 0.0:
            seed = int(reference.new_dropout_seed(q.device))
            mask = reference.dropout_keep_mask(seed, *q.shape[:3], k.shape[2], p, q.device)
        return reference.attention(q, k, v, True, p, dropout_mask=mask)

    inputs = tuple(t[:1, :2] for t in (q, k, v))
    return lambda: check_against_reference(lambda q, k, v: attend(q, k, v, p), expected, inputs, q.dtype,
                                           f"attention {backend} p={p}", backward=backward)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape,backend,dtype", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{b}-{str(dt)[6:]}" for s, b, dt in CASES])
def test_attention(timed, shape, backend, dtype, mode):
    skip_unless_runnable(backend)
    b, h, t, d, p = shape
    q, k, v = attention_inputs(b, h, t, t, d, DEVICE, dtype, seed=0, requires_grad=mode != "fwd")  # nanoGPT's layout
    grad = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype)
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
                dtype=str(dtype).removeprefix("torch."))
    timed(fn, f"attention {mode} {info['shape']} {info['dtype']}", backend, info, {"flop": flop},
          validation(backend, attend, q, k, v, p, backward=mode != "fwd"))


# Today's models: a key-padding mask (each sequence a different length) and GQA (6 query heads over 2 KV heads),
# each against F.sdpa given the same request. (B, Hq, Hkv, T, D)
MODEL_SHAPES = [(64, 6, 2, 256, 64)] if DEVICE == "cuda" else [(16, 6, 2, 256, 64)]
MODEL_CASES = [(kind, shape, backend) for kind in ("padding-mask", "gqa") for shape in MODEL_SHAPES
               for backend in BACKENDS if backend != "torch.compile"]


def padding_mask(b, t, device):
    """(B, 1, 1, T) bool: sequence i keeps its first T - 8 * i keys (at least 8)."""
    lengths = torch.clamp(t - 8 * torch.arange(b, device=device), min=8)
    return (torch.arange(t, device=device)[None, :] < lengths[:, None])[:, None, None, :]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kind,shape,backend", MODEL_CASES, ids=[f"{k}-{'x'.join(map(str, s))}-{b}"
                                                                 for k, s, b in MODEL_CASES])
def test_attention_masks_and_gqa(timed, kind, shape, backend, mode):
    skip_unless_runnable(backend)
    b, hq, hkv, t, d = shape
    gqa = kind == "gqa"
    mask = None if gqa else padding_mask(b, t, DEVICE)
    if backend not in ("torch", "eager"):  # time only what the backend fuses: a silent fallback would time torch
        try:
            chargpt_kernels.backends.backend_for(backend, "attention", DEVICE, DTYPE, ("gqa",) if gqa else ("mask",))
        except TypeError as lacking:
            pytest.skip(str(lacking))
    q = attention_inputs(b, hq, t, t, d, DEVICE, DTYPE, seed=0, requires_grad=mode != "fwd")[0]
    _, k, v = attention_inputs(b, hkv if gqa else hq, t, t, d, DEVICE, DTYPE, seed=1, requires_grad=mode != "fwd")
    # Padding: causal comes from the mask too (transformers builds such 4-D masks), so is_causal stays False.
    causal = torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril()
    full_mask = None if gqa else mask & causal

    def rows_of(q):  # the mask rows of q's batch (the check runs on the first two)
        return None if full_mask is None else full_mask[:q.shape[0]]

    def attend(q, k, v):
        kwargs = dict(attn_mask=rows_of(q), is_causal=gqa, enable_gqa=gqa)
        if backend == "torch":
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        with chargpt_kernels.use_backend(backend):
            return chargpt_kernels.scaled_dot_product_attention(q, k, v, **kwargs)

    def expected(q, k, v):
        return reference.attention(q, k, v, gqa, 0.0, None, rows_of(q))

    grad = torch.randn(b, hq, t, d, device=DEVICE, dtype=DTYPE)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                attend(q, k, v)
    else:
        def fn():
            torch.autograd.grad(attend(q, k, v), (q, k, v), grad)

    def check():
        inputs = tuple(x[:2] for x in (q, k, v))  # two batch rows: enough to tell the mask's rows apart
        check_against_reference(attend, expected, inputs, DTYPE, f"{kind} {backend}", backward=mode != "fwd")

    flop = 2 * b * hq * t * t * d * (1 if mode == "fwd" else 3.5)
    info = dict(op="attention", mode=mode, shape=f"{kind} B={b} Hq={hq}" + (f" Hkv={hkv}" if gqa else "")
                + f" T={t} D={d}", dtype=str(DTYPE).removeprefix("torch."))
    timed(fn, f"attention {mode} {info['shape']} {info['dtype']}", backend, info, {"flop": flop}, check)
