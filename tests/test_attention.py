"""Every fused attention backend against the float64 eager reference, forward and backward."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import attention_inputs

from conftest import FUSED_BACKENDS, assert_close, device_dtype_params, require_backend

# (B, H, Tq, Tk, D): odd lengths, odd head dims, a single token, Tq != Tk.
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 7, 7, 40),
    (1, 2, 64, 64, 59),
    (2, 1, 113, 113, 80),
    (1, 2, 203, 203, 64),
    (1, 1, 113, 113, 128),
    (1, 1, 7, 7, 256),
    (2, 2, 5, 19, 32),
]


def run_both(backend, q, k, v, is_causal, dropout_p=0.0, scale=None, mask=None):
    """Output and (dq, dk, dv) of the backend and of the float64 reference, under the same upstream gradient."""
    with chargpt_kernels.use_backend(backend):
        out = chargpt_kernels.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal,
                                                           scale=scale)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, is_causal, dropout_p, scale, dropout_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    return (out, *grads), (ref, *ref_grads)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, device, dtype, is_causal, shape):
    require_backend(backend, device, dtype)
    q, k, v = attention_inputs(*shape, device, dtype, seed=hash((shape, is_causal)) % 2**31)
    got, want = run_both(backend, q, k, v, is_causal)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, b, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_custom_scale_and_causal_attention_api(backend, device, dtype):
    require_backend(backend, device, dtype)
    q, k, v = attention_inputs(2, 2, 33, 33, 48, device, dtype, seed=5)
    out = chargpt_kernels.causal_attention(q, k, v, scale=0.3, backend=backend)
    ref = reference.attention(q.double(), k.double(), v.double(), True, scale=0.3)
    assert_close(out, ref, dtype, f"{backend} scale=0.3")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d", [24, 64])  # on CUDA in fp16/bf16, 64 takes the tensor-core kernels and 24 does not
def test_dropout_uses_the_specified_mask(backend, device, dtype, is_causal, d):
    """The kernel's dropout is exactly the Philox mask of chargpt_kernels.reference: checked on output and gradients."""
    require_backend(backend, device, dtype)
    b, h, t, p = 2, 3, 37, 0.3
    q, k, v = attention_inputs(b, h, t, t, d, device, dtype, seed=11)
    torch.manual_seed(1234)
    seed = int(reference.new_dropout_seed(device))
    mask = reference.dropout_keep_mask(seed, b, h, t, t, p, device=device)
    torch.manual_seed(1234)
    got, want = run_both(backend, q, k, v, is_causal, dropout_p=p, mask=mask)
    for name, a, bb in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, bb, dtype, f"{backend} dropout {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_dropout_properties(backend):
    """Read the dropped attention weights out directly (v = identity): seed reproducibility, kept fraction,
    exact 1/(1-p) scaling of the kept weights, and nothing above the diagonal."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    require_backend(backend, device)
    b, h, t, p = 2, 2, 64, 0.2
    q = torch.randn(b, h, t, t, device=device)
    k = torch.randn(b, h, t, t, device=device)
    v = torch.eye(t, device=device).expand(b, h, t, t)
    weights = lambda: chargpt_kernels.causal_attention(q, k, v, dropout_p=p, backend=backend)  # noqa: E731
    torch.manual_seed(7)
    w1 = weights()
    torch.manual_seed(7)
    w2 = weights()
    torch.manual_seed(8)
    w3 = weights()
    assert torch.equal(w1, w2), "same seed must give the same dropout mask"
    assert not torch.equal(w1 != 0, w3 != 0), "another seed must give another mask"
    assert (w1.triu(1) == 0).all(), "dropout must never unmask the future"
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    kept = (w1 != 0) & causal
    kept_fraction = kept.sum().item() / (causal.sum().item() * b * h)
    assert abs(kept_fraction - (1 - p)) < 0.05, f"kept fraction {kept_fraction:.3f}, expected {1 - p}"
    undropped = reference.attention(q.double(), k.double(), v.double(), True)
    torch.testing.assert_close(w1[kept].double(), undropped[kept] / (1 - p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_matches_torch_sdpa(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    require_backend(backend, "cuda")
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = attention_inputs(4, 6, 256, 256, 64, "cuda", dtype, seed=3)
        with chargpt_kernels.use_backend(backend):
            out = chargpt_kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        assert_close(out, want, dtype, f"{backend} vs F.sdpa")


def test_sdpa_dropin_folds_leading_dims_and_falls_back_with_one_warning(recwarn, monkeypatch):
    monkeypatch.setattr(chargpt_kernels.api, "_warned", set())  # as in a fresh process: earlier tests may have warned
    q, k, v = (torch.randn(3, 10, 16) for _ in range(3))
    out = chargpt_kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    mask = torch.randn(10, 10, requires_grad=True)  # no fused kernel takes a mask that wants a gradient
    for _ in range(2):
        out = chargpt_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    messages = [str(w.message) for w in recwarn if "attn_mask" in str(w.message)]
    assert len(messages) == 1, messages
    big = torch.randn(1, 1, 4, 300)
    with pytest.warns(UserWarning, match="head dim"):
        out = chargpt_kernels.scaled_dot_product_attention(big, big, big)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(big, big, big))


def test_sdpa_can_replace_torchs_own(monkeypatch):
    """Code that calls F.scaled_dot_product_attention can be pointed at ours; the fallback must not recurse."""
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", chargpt_kernels.scaled_dot_product_attention)
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    with warnings.catch_warnings():  # the fallback warns once per process: maybe here, maybe earlier
        warnings.simplefilter("ignore")
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(masked, original(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ("eager",) + FUSED_BACKENDS)
def test_bad_input_raises_with_a_message(backend):
    require_backend(backend, "cpu")
    q = torch.randn(2, 2, 8, 16)
    cases = [
        ((q[0], q[0], q[0]), ValueError, "4-D"),
        ((q, q[:, :, :4], q), ValueError, "same shape"),
        ((q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)), ValueError, "agree"),
        ((q.long(), q.long(), q.long()), TypeError, "floating-point"),
        ((q, q.double(), q), TypeError, "float64"),
        ((torch.randn(1, 1, 4, 257),) * 3, ValueError, "head dim"),
        ((q, q.to("meta"), q), ValueError, "meta"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            chargpt_kernels.causal_attention(*args, backend=backend)
    with pytest.raises(ValueError, match="dropout_p"):
        chargpt_kernels.causal_attention(q, q, q, dropout_p=1.0, backend=backend)


def test_reference_philox_matches_known_stream():
    """The shared dropout spec is deterministic and uniform: pinned values guard it against silent edits."""
    u = reference.philox_uniform(12345, torch.arange(4, dtype=torch.int64))
    torch.testing.assert_close(u, torch.tensor([0.3596, 0.0056, 0.8451, 0.5762]), rtol=0, atol=1e-4)
    many = reference.philox_uniform(99, torch.arange(2**16, dtype=torch.int64) + 2**33)
    assert 0.0 <= many.min() and many.max() < 1.0 and abs(many.mean().item() - 0.5) < 0.01
    assert math.isclose(reference.dropout_keep_mask(3, 2, 2, 50, 50, 0.25).float().mean().item(), 0.75, abs_tol=0.02)
