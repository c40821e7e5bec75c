"""Attention for today's models on every fused backend that fuses them: attn_mask (bool and additive, every
broadcast shape, read through strides), GQA/MQA and decode shapes, forward and backward, against the float64
reference. A backend that does not list a feature (chargpt_kernels.backends SUPPORTED_FEATURES) is skipped here; what
the drop-in does then (one warning, torch's result) is tested in test_attention.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close, attention_inputs, check_against_reference

from conftest import FUSED_BACKENDS, device_dtype_params, require_attention_features


def key_padding(b, tk, gen, device):
    """(B, 1, 1, Tk) bool: each sequence keeps a random-length prefix, one of them none at all (a fully masked
    row), the last one every key."""
    lengths = torch.randint(1, tk + 1, (b,), generator=gen)
    lengths[0], lengths[-1] = 0, tk
    return (torch.arange(tk)[None, :] < lengths[:, None])[:, None, None, :].to(device)


def make_mask(kind, b, h, tq, tk, device, dtype, seed):
    """attn_mask of one of the forms models hand over, from fresh random numbers."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "padding":  # (B, 1, 1, Tk), as BERT and GPT-2 with an attention_mask
        return key_padding(b, tk, gen, device)
    if kind == "left-padding":  # (B, 1, 1, Tk) keeping a suffix: with Tk > 64 whole leading key tiles are masked
        lengths = torch.full((b,), max(1, tk // 3))
        lengths[0], lengths[-1] = 0, tk
        return (torch.arange(tk)[None, :] >= tk - lengths[:, None])[:, None, None, :].to(device)
    if kind == "bool-4d":  # (B, 1, Tq, Tk): transformers' combined causal + padding mask, here random
        return (torch.rand(b, 1, tq, tk, generator=gen) > 0.4).to(device)
    if kind == "bool-2d":  # (Tq, Tk), with whole rows and whole columns masked out
        keep = torch.rand(tq, tk, generator=gen) > 0.3
        keep[tq // 2] = False
        keep[:, tk // 2] = False
        return keep.to(device)
    if kind == "additive":  # (B, H, Tq, Tk) float bias of q's dtype, some -inf
        bias = torch.randn(b, h, tq, tk, generator=gen)
        bias[torch.rand(b, h, tq, tk, generator=gen) > 0.8] = float("-inf")
        return bias.to(device, dtype)
    if kind == "additive-strided":  # (B, 1, Tq, Tk) transposed storage: no dim has stride 1
        bias = torch.randn(b, tk, tq, generator=gen).transpose(1, 2)[:, None]
        return bias.to(device, dtype)
    raise ValueError(kind)


MASKS = ["padding", "left-padding", "bool-4d", "bool-2d", "additive", "additive-strided"]
# (B, Hq, Hk, Tq, Tk, D): odd lengths and head dims, Tq != Tk, a single query.
MASK_SHAPES = [(2, 3, 3, 7, 7, 40), (3, 2, 2, 113, 113, 59), (2, 2, 2, 5, 19, 80), (3, 2, 2, 1, 70, 32)]


def check(backend, q, k, v, dtype, what, attn_mask=None, is_causal=False):
    """The backend's output and gradients against the float64 reference for the same F.sdpa call; GQA when k has
    fewer heads than q. A fallback to torch warns, and here that is a failure."""
    gqa = q.shape[1] != k.shape[1]
    ref_mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()

    def fused(q, k, v):
        with chargpt_kernels.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("error")
            return chargpt_kernels.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                        enable_gqa=gqa)

    def ref(q, k, v):
        return reference.attention(q, k, v, is_causal, 0.0, None, ref_mask)

    check_against_reference(fused, ref, (q, k, v), dtype, what)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_match_reference(backend, device, dtype, kind, shape):
    require_attention_features(backend, device, dtype, ("mask",))
    b, hq, hk, tq, tk, d = shape
    q, k, v = attention_inputs(b, hq, tq, tk, d, device, dtype, seed=hash((kind, shape)) % 2**31, h_kv=hk)
    mask = make_mask(kind, b, hq, tq, tk, device, dtype, seed=7)
    check(backend, q, k, v, dtype, f"{backend} {kind} mask", attn_mask=mask)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("hq,hk", [(6, 6), (6, 3), (6, 2), (6, 1), (8, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_gqa_matches_reference(backend, device, dtype, hq, hk, is_causal):
    """Query groups of 1, 2, 3, 6 and 8 heads: dK/dV summed over each group inside the kernel."""
    require_attention_features(backend, device, dtype, ("gqa",))
    q, k, v = attention_inputs(2, hq, 37, 37, 24, device, dtype, seed=hq * 10 + hk, h_kv=hk)
    check(backend, q, k, v, dtype, f"{backend} gqa {hq}/{hk}", is_causal=is_causal)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_gqa_with_padding_mask(backend, device, dtype):
    require_attention_features(backend, device, dtype, ("mask", "gqa"))
    q, k, v = attention_inputs(3, 6, 29, 29, 40, device, dtype, seed=3, h_kv=2)
    mask = make_mask("padding", 3, 6, 29, 29, device, dtype, seed=4) & torch.ones(29, 29, dtype=torch.bool,
                                                                                  device=device).tril()
    check(backend, q, k, v, dtype, f"{backend} gqa + mask", attn_mask=mask)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("tk", [1, 7, 1024, 4096])
def test_decode_shapes(backend, device, dtype, tk):
    """One new token against a KV cache (Tq = 1; causal then sees every key), with GQA and a padding mask."""
    require_attention_features(backend, device, dtype, ("mask", "gqa"))
    q, k, v = attention_inputs(2, 6, 1, tk, 64, device, dtype, seed=tk, h_kv=2)
    check(backend, q, k, v, dtype, f"{backend} decode Tk={tk}", is_causal=True)
    mask = make_mask("padding", 2, 6, 1, tk, device, dtype, seed=tk)
    mask[0] = True  # keep one row with keys: the fully masked one is covered above
    check(backend, q, k, v, dtype, f"{backend} decode Tk={tk} masked", attn_mask=mask)


# Decoding shapes (B, Hq, Hk, Tq, Tk, causal, mask) that take the ext CPU kernel's decode paths: a GQA group's
# heads in one task (Hq/Hk * Tq <= 64 rows), wide key tiles (<= 16 rows), and keys split over up to 16 tasks, with
# splits that see no key (causal with Tq < Tk, a left-padded prefix) and a last split shorter than the others.
DECODE_SPLIT_CASES = [(1, 6, 6, 1, 1001, False, None), (1, 8, 1, 3, 700, True, None),
                      (1, 8, 1, 3, 700, False, "left-padding"), (2, 6, 2, 2, 1500, False, "padding"),
                      (1, 4, 1, 1, 4100, False, "additive")]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", DECODE_SPLIT_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[6]}")
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "dropout"])
def test_decode_splits(backend, device, dtype, case, dropout_p):
    require_attention_features(backend, device, dtype, ("mask", "gqa"))
    b, hq, hk, tq, tk, is_causal, kind = case
    q, k, v = attention_inputs(b, hq, tq, tk, 64, device, dtype, seed=tk + tq, h_kv=hk)
    mask = None if kind is None else make_mask(kind, b, hq, tq, tk, device, dtype, seed=tk)
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    torch.manual_seed(5)
    keep = reference.dropout_keep_mask(int(reference.new_dropout_seed(device)), b, hq, tq, tk, dropout_p,
                                       device=device) if dropout_p else None

    def fused(q, k, v):
        torch.manual_seed(5)
        with chargpt_kernels.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("error")
            return chargpt_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                        is_causal=is_causal, enable_gqa=hq != hk)

    def ref(q, k, v):
        return reference.attention(q, k, v, is_causal, dropout_p, None, ref_mask, dropout_mask=keep)

    check_against_reference(fused, ref, (q, k, v), dtype, f"{backend} decode {case} dropout {dropout_p}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("d", [40, 59, 80])
@pytest.mark.parametrize("hq,hk,tq", [(2, 2, 1), (4, 2, 1), (3, 1, 1), (8, 2, 1), (2, 1, 2)],
                         ids=["1-row", "2-rows", "3-rows", "4-rows", "2x2-rows"])
def test_decode_odd_head_dims(backend, d, hq, hk, tq):
    """Decoding tasks of 1 to 4 query rows (the ext CPU kernel's hand-written products) at head dims that leave a
    vector tail, with a padding mask, against float64."""
    require_attention_features(backend, "cpu", torch.float32, ("mask", "gqa"))
    q, k, v = attention_inputs(2, hq, tq, 300, d, "cpu", torch.float32, seed=d + hq, h_kv=hk)
    mask = make_mask("padding", 2, hq, tq, 300, "cpu", torch.float32, seed=d)
    check(backend, q, k, v, torch.float32, f"{backend} decode D={d} Hq={hq} Hk={hk} Tq={tq}", attn_mask=mask)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_decode_non_finite_key_spoils_only_its_group(backend, value):
    """A NaN (or inf) in one key, inside one of several splits: NaN exactly where float64 has it (every head of
    that kv head's group for NaN; for inf, the heads whose score is +inf), the rest exact; the combine of the
    splits neither hides nor spreads it."""
    require_attention_features(backend, "cpu", torch.float32, ("gqa",))
    q, k, v = attention_inputs(1, 4, 1, 600, 32, "cpu", torch.float32, seed=8, h_kv=2, requires_grad=False)
    k = k.clone()
    k[0, 1, 400, 5] = float(value)
    with chargpt_kernels.use_backend(backend):
        out = chargpt_kernels.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = reference.attention(q.double(), k.double(), v.double())
    assert want[0, 2:].isnan().any() and not want[0, :2].isnan().any()
    assert torch.equal(out.isnan(), want.isnan()), f"NaN at {out.isnan().sum()} entries, float64 {want.isnan().sum()}"
    assert_close(out.nan_to_num(), want.nan_to_num(), torch.float32, f"{backend} decode, the finite entries")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("kind", ["padding", "additive"])
def test_mask_with_causal_and_dropout(backend, device, dtype, kind):
    """causal_attention combines attn_mask with the causal mask and dropout (the mask spec of
    chargpt_kernels.reference)."""
    require_attention_features(backend, device, dtype, ("mask", "gqa"))
    b, hq, hk, t, p = 3, 4, 2, 37, 0.3
    q, k, v = attention_inputs(b, hq, t, t, 24, device, dtype, seed=21, h_kv=hk)
    mask = make_mask(kind, b, hq, t, t, device, dtype, seed=22)
    torch.manual_seed(99)
    keep = reference.dropout_keep_mask(int(reference.new_dropout_seed(device)), b, hq, t, t, p, device=device)
    ref_mask = mask if mask.dtype == torch.bool else mask.double()

    def fused(q, k, v):
        torch.manual_seed(99)
        return chargpt_kernels.causal_attention(q, k, v, dropout_p=p, attn_mask=mask, enable_gqa=True, backend=backend)

    def ref(q, k, v):
        return reference.attention(q, k, v, True, p, None, ref_mask, dropout_mask=keep)

    check_against_reference(fused, ref, (q, k, v), dtype, f"{backend} {kind} + causal + dropout")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_mask_that_requires_grad_falls_back(backend, monkeypatch):
    """No gradient flows to a mask from the kernels: a mask that requires grad falls back to torch (with one
    warning), and causal_attention refuses it."""
    require_attention_features(backend, "cpu", torch.float32, ("mask",))
    monkeypatch.setattr(chargpt_kernels.api, "_warned", set())  # as in a fresh process: earlier tests may have warned
    q, k, v = attention_inputs(2, 3, 9, 9, 16, "cpu", torch.float32, seed=0)
    bias = torch.randn(2, 1, 1, 9, requires_grad=True)
    with chargpt_kernels.use_backend(backend), pytest.warns(UserWarning, match="requires grad"):
        out = chargpt_kernels.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out.sum().backward()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    with pytest.raises(ValueError, match="must not require grad"):
        chargpt_kernels.causal_attention(q, k, v, attn_mask=bias, backend=backend)



# (B, Hq, Hk, Tq, Tk, D): square, GQA with Tq < Tk (decoding a chunk), and Tq > Tk, where rows past Tk + window - 1
# see no key at all (0, as fully masked rows give).
WINDOW_SHAPES = [(2, 2, 2, 113, 113, 40), (1, 4, 2, 7, 150, 59), (1, 2, 1, 40, 9, 80)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("window", [1, 5, 70, 1000])
@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sliding_window(backend, window, shape):
    """causal_attention(window=w): query i sees keys i - w < j <= i, outputs and gradients against float64 with that
    band written out as a mask."""
    b, hq, hk, tq, tk, d = shape
    require_attention_features(backend, "cpu", torch.float32, ("mask",) + (("gqa",) if hq != hk else ()))
    q, k, v = attention_inputs(b, hq, tq, tk, d, "cpu", torch.float32, seed=window + tq, h_kv=hk)
    i, j = torch.arange(tq)[:, None], torch.arange(tk)[None, :]
    band = (j <= i) & (j > i - window)

    def fused(q, k, v):
        return chargpt_kernels.causal_attention(q, k, v, backend=backend, enable_gqa=hq != hk, window=window)

    check_against_reference(fused, lambda q, k, v: reference.attention(q, k, v, False, 0.0, None, band),
                            (q, k, v), torch.float32, f"{backend} window {window} {shape}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kind", ["padding", "additive"])
def test_sliding_window_with_a_mask(backend, kind):
    """The window narrows a model's own mask (bool: both must keep a key; additive: -inf outside the window)."""
    require_attention_features(backend, "cpu", torch.float32, ("mask",))
    q, k, v = attention_inputs(2, 3, 70, 70, 40, "cpu", torch.float32, seed=11)
    mask = make_mask(kind, 2, 3, 70, 70, "cpu", torch.float32, seed=12)
    i, j = torch.arange(70)[:, None], torch.arange(70)[None, :]
    band = (j > i - 9)
    ref_mask = mask & band if kind == "padding" else mask.double().masked_fill(~band, float("-inf"))

    def fused(q, k, v):
        return chargpt_kernels.causal_attention(q, k, v, backend=backend, attn_mask=mask, window=9)

    check_against_reference(fused, lambda q, k, v: reference.attention(q, k, v, True, 0.0, None, ref_mask),
                            (q, k, v), torch.float32, f"{backend} window 9 + {kind}")


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_sliding_window_must_be_a_positive_int(window):
    q, k, v = attention_inputs(1, 1, 4, 4, 8, "cpu", torch.float32, seed=0)
    with pytest.raises(ValueError, match="window must be a positive int"):
        chargpt_kernels.causal_attention(q, k, v, backend="eager", window=window)
