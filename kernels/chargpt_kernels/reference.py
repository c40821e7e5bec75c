"""Eager PyTorch reference ops: the ground truth every backend is tested against.

Written with plain composed torch ops, in whatever dtype they are given (tests call them in float64).
They double as the `eager` backend, so they must stay differentiable and readable rather than fast.

This file also owns the *dropout RNG specification* shared by every fused backend (llm.c habit: the
reference sits beside the kernels). A fused kernel never stores its dropout mask; it regenerates it from

    attention:  u[b, h, i, j] = philox_uniform(seed, offset=((b * H + h) * Tq + i) * Tk + j)
    add_norm:   u[i, j]       = philox_uniform(seed, offset=i * N + j)     (x flattened to rows of N)
    keep = u >= p            (kept entries are scaled by 1 / (1 - p))

where `philox_uniform` is exactly Triton's `tl.rand(seed, offset)` with an int64 offset: Philox4x32-10 with
key (seed_lo, seed_hi) and counter (offset_lo, offset_hi, 0, 0); the first output word, read as int32,
folded to non-negative with `~x`, converted to float32 and multiplied by float32(4.6566127342e-10).
`dropout_keep_mask` below computes the same mask with torch integer ops, so tests can check a fused
kernel's dropout output and gradients exactly against the reference.
"""

import math

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # largest value with (2**31 - 1) * scale < 1 in float32


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension of x (biased variance, like nn.LayerNorm).

    The statistics are taken of x shifted by each row's first element: a constant row then has mean and deviations
    exactly 0 (so it normalizes to exactly 0 even at eps=1e-12, as torch's does), and a large common offset does not
    cancel precision away. The shift changes nothing else: LayerNorm is invariant to it."""
    shifted = x - x[..., :1]
    mean = shifted.mean(dim=-1, keepdim=True)
    var = ((shifted - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (shifted - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, weight=None, eps=None):
    """RMSNorm over the last dimension of x, like F.rms_norm: x / sqrt(mean(x^2) + eps) * weight.

    eps None means torch's default, the machine epsilon of x's dtype."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def add_norm(x, residual, weight=None, bias=None, eps=1e-5, norm="layer", dropout_p=0.0, dropout_mask=None):
    """(y, h) with h = residual + dropout(x) and y = norm(h): a pre-LN block's residual add fused with the next norm.

    norm is "layer" (weight and bias) or "rms" (weight only; eps None means torch's default). Dropout acts on x:
    with `dropout_mask` (a bool keep-mask of x's shape) that exact mask is used, otherwise F.dropout draws one."""
    if dropout_p > 0.0:
        x = torch.nn.functional.dropout(x, dropout_p) if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    h = residual + x
    y = layer_norm(h, weight, bias, eps) if norm == "layer" else rms_norm(h, weight, eps)
    return y, h


def linear(x, weight, bias=None):
    """x @ weight^T + bias, like F.linear: x (..., K), weight (N, K), bias (N,) or None."""
    y = x @ weight.transpose(0, 1)
    return y if bias is None else y + bias


def attention(q, k, v, is_causal=False, dropout_p=0.0, scale=None, attn_mask=None, dropout_mask=None):
    """softmax(q @ k^T * scale + mask) @ v over (..., H, T, D) tensors, the way F.scaled_dot_product_attention
    defines it.

    Causal masking is top-left aligned (query i sees keys j <= i), as in torch. attn_mask is bool (True = take part)
    or additive float, broadcastable to the scores (..., Hq, Tq, Tk). k and v may have fewer heads than q (GQA: Hq a
    multiple of Hk; query head h reads key/value head h // (Hq / Hk)). A row with no visible key (every score -inf)
    gives 0, as torch does. Dropout acts on the attention weights: with `dropout_mask` (a bool keep-mask of shape
    (..., Tq, Tk)) that exact mask is used, otherwise F.dropout draws one.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        tq, tk = scores.shape[-2:]
        future = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    blind = (scores == float("-inf")).all(dim=-1, keepdim=True)  # rows that see no key: 0, not NaN
    weights = torch.softmax(scores.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)
    if dropout_p > 0.0:
        if dropout_mask is None:
            weights = torch.nn.functional.dropout(weights, dropout_p)
        else:
            weights = weights * dropout_mask / (1.0 - dropout_p)
    return weights @ v


def _mulhilo(a, b):
    """(hi, lo) 32-bit words of the 64-bit product of two uint32 values held in int64 tensors.

    Split into 16-bit halves so no intermediate overflows int64."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    hi_hi = a_hi * b_hi
    cross = (lo_lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)
    lo = ((cross & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    hi = hi_hi + (mid1 >> 16) + (mid2 >> 16) + (cross >> 16)
    return hi & _MASK32, lo & _MASK32


def philox_uniform(seed, offsets):
    """Triton's tl.rand(seed, offsets) for int64 offsets, in torch ops: float32 uniforms in [0, 1)."""
    seed = int(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(torch.full_like(c2, _PHILOX_ROUND_B), c2)
        hi_a, lo_a = _mulhilo(torch.full_like(c0, _PHILOX_ROUND_A), c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep_mask(seed, batch, heads, tq, tk, p, device="cpu"):
    """The (batch, heads, tq, tk) bool keep-mask every fused backend draws for `seed` (see module docstring)."""
    offsets = torch.arange(batch * heads * tq * tk, dtype=torch.int64, device=device)
    keep = philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32)
    return keep.view(batch, heads, tq, tk)


def new_dropout_seed(device):
    """A fresh dropout seed drawn from torch's generator for `device` (so torch.manual_seed reproduces it).

    Returned as a 1-element int64 tensor on `device`: kernels read it from memory, which keeps the call
    free of host syncs and traceable by torch.compile."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
