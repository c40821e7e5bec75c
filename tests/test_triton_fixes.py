"""Regression tests for the Triton modules' edge cases, each one seen failing before its fix.

They call chargpt_kernels.triton_layer_norm / chargpt_kernels.triton_attention directly (not the public API, which may
route edge cases elsewhere), on CPU under the interpreter or on CUDA, against the float64 reference or torch.
"""

import pytest
import torch

from chargpt_kernels import reference
from chargpt_kernels.backends import unavailable_reason
from chargpt_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None,
                                reason=f"triton backend: {unavailable_reason('triton')}")


def _grads(fn, inputs, grad=None):
    """fn(*inputs) and the gradients of every input (fresh leaves), under `grad` (default: seeded randn)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return (out, *torch.autograd.grad(out, leaves, grad)), grad


# --- LayerNorm: weight and bias are read through their strides ---------------------------------------------------

@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("n", [40, 4099], ids=["one-block", "swept"])
def test_layer_norm_weight_and_bias_views(n, layout):
    """A slice w[::2] or an expanded scalar as weight/bias: read through its strides; dw, db get its shape."""
    from chargpt_kernels import triton_layer_norm

    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(3, n, generator=gen) * 2 + 0.5).to(DEVICE)
    if layout == "strided":
        w, b = torch.randn(2 * n, generator=gen)[::2], torch.randn(3 * n, generator=gen)[::3]
    else:
        w, b = torch.randn(1, generator=gen).expand(n), torch.randn(1, generator=gen).expand(n)
    w, b = w.to(DEVICE), b.to(DEVICE)
    got, grad = _grads(lambda x, w, b: triton_layer_norm.layer_norm(x, w, b, 1e-5), (x, w, b))
    want, _ = _grads(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), (x.double(), w.double(), b.double()),
                     grad.double())
    for what, a, e in zip(("y", "dx", "dw", "db"), got, want):
        assert_close(a, e, torch.float32, f"{layout} weight/bias {what} (n={n})")


# --- Attention: outputs in the layout the kernels write ----------------------------------------------------------

B, H, T, D = 2, 3, 40, 8


def _attention_layouts():
    """name -> function making a (B, H, T, D) tensor in that layout from a generator."""
    return {
        "transposed": lambda gen: torch.randn(B, T, H, D, generator=gen).transpose(1, 2),  # nanoGPT's view
        "head-stride-1": lambda gen: torch.randn(B, T, D, H, generator=gen).permute(0, 3, 1, 2),  # stride(1) == 1
        "expanded-batch": lambda gen: torch.randn(1, H, T, D, generator=gen).expand(B, H, T, D),  # stride 0
        "expanded-head": lambda gen: torch.randn(B, 1, T, D, generator=gen).expand(B, H, T, D),
        # heads overlapping, one element apart (stride(1) == 1, unit last stride): empty_like gives no unit last stride
        "overlapping-heads": lambda gen: torch.randn(T * (H + D) + D, generator=gen).as_strided(
            (B, H, T, D), (0, 1, H + D, 1)),
    }


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("layout", list(_attention_layouts()))
def test_attention_inputs_in_any_layout(layout, which):
    """Any input layout gives the reference's output and gradients, in plain contiguous (B, H, T, D) tensors."""
    from chargpt_kernels import triton_attention

    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(B, H, T, D, generator=gen) for _ in range(3)]
    inputs["qkv".index(which)] = _attention_layouts()[layout](gen)
    inputs = [t.to(DEVICE) for t in inputs]
    got, grad = _grads(lambda q, k, v: triton_attention.attention(q, k, v, True, 0.0, 0.3), inputs)
    want, _ = _grads(lambda q, k, v: reference.attention(q, k, v, True, 0.0, 0.3), [t.double() for t in inputs],
                     grad.double())
    for what, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, torch.float32, f"{which} {layout}: {what}")


@pytest.mark.parametrize("layout", ["transposed", "head-stride-1", "overlapping-heads"])
def test_attention_op_returns_contiguous_tensors(layout):
    """The op allocates what its kernels write (contiguous (B, H, T, D)), so fake tensors (torch.compile) and real
    ones agree on strides whatever the inputs' layout."""
    from chargpt_kernels import triton_attention

    gen = torch.Generator().manual_seed(4)
    q, k, v = (_attention_layouts()[layout](gen).to(DEVICE) for _ in range(3))
    out, lse = triton_attention.attention_forward(q, k, v, None, None, True, 0.0, 0.3)
    dq, dk, dv = triton_attention.attention_backward(torch.randn_like(out), q, k, v, out, lse, None, None, True, 0.0,
                                                     0.3)
    for what, t, like in [("out", out, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v)]:
        assert t.shape == like.shape and t.is_contiguous(), f"{what}: {tuple(t.shape)} strides {t.stride()}"


# --- Attention: NaN and inf propagate like torch's -----------------------------------------------------------------

def _visible_only(q, k, v, is_causal, scale):
    """Attention with each query row computed over exactly the keys it sees (F.sdpa per row, no mask): NaN lands
    only where the maths puts it, never through a 0 * NaN on a masked entry."""
    import torch.nn.functional as F

    if not is_causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    rows = [F.scaled_dot_product_attention(q[..., i:i + 1, :], k[..., :i + 1, :], v[..., :i + 1, :], scale=scale)
            for i in range(q.shape[-2])]
    return torch.cat(rows, dim=-2)


NON_FINITE = [("q", "nan"), ("q", "inf"), ("q", "-inf"), ("k", "nan"), ("k", "inf"), ("k", "-inf"), ("v", "nan"),
              ("v", "inf")]


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("which,value", NON_FINITE, ids=[f"{w}-{v}" for w, v in NON_FINITE])
def test_attention_non_finite_inputs_propagate_like_torch(which, value, is_causal):
    """One non-finite element in q, k or v: output and gradients NaN where torch's (float64) are, never less than
    the maths demands, the same values elsewhere. Causal: torch's math also spreads NaN through the 0 weights of
    masked entries; a tiled kernel does that only inside the tiles it visits, so there torch's NaN set bounds ours
    from above and the per-row computation from below (equal for full attention)."""


    b, h, t, d, scale = 1, 2, 70, 8, 0.35  # 70 rows: several query and key tiles in every kernel
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(b, h, t, d, generator=gen) for _ in range(3)]
    inputs["qkv".index(which)][0, 1, 45, 3] = float(value)
    _check_like_torch(inputs, is_causal, scale)


def _check_like_torch(inputs, is_causal, scale):
    """The triton attention's out, dq, dk, dv for float32 `inputs` against torch's (see the test above)."""
    import torch.nn.functional as F

    from chargpt_kernels import triton_attention

    got, grad = _grads(lambda q, k, v: triton_attention.attention(q, k, v, is_causal, 0.0, scale),
                       [x.to(DEVICE) for x in inputs])
    inputs64 = [x.double() for x in inputs]
    grad64 = grad.double().cpu()
    exact, _ = _grads(lambda q, k, v: _visible_only(q, k, v, is_causal, scale), inputs64, grad64)
    torch_, _ = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale),
                       inputs64, grad64)
    ref, _ = _grads(lambda q, k, v: reference.attention(q, k, v, is_causal, 0.0, scale), inputs64, grad64)
    for what, a, lower, upper, r in zip(("out", "dq", "dk", "dv"), got, exact, torch_, ref):
        nan = a.cpu().isnan()
        lost = lower.isnan() & ~nan
        assert not lost.any(), f"{what}: NaN lost ({int(lost.sum())} entries)"
        extra = nan & ~upper.isnan()
        assert not extra.any(), f"{what}: NaN where torch has none ({int(extra.sum())} entries)"
        if not is_causal:
            assert torch.equal(nan, upper.isnan()) and torch.equal(nan, r.isnan()), f"{what}: NaN mask"
        finite = lower[~nan].abs()
        tol = 2e-5 * max(1.0, finite[finite.isfinite()].max().item()) if finite.isfinite().any() else 2e-5
        close = torch.isclose(a.cpu()[~nan].double(), lower[~nan], rtol=2e-5, atol=tol)
        assert close.all(), f"{what}: {int((~close).sum())} values differ, e.g. {a.cpu()[~nan][~close][:4].tolist()}"
    return got


@pytest.mark.parametrize("case", ["q-row", "first-key-causal", "q-row-causal"])
def test_attention_rows_that_see_no_key_give_zero(case):
    """A row whose every visible score is -inf (what a mask will make; reachable today with -inf in q or k) gives 0
    output and 0 gradient, as torch does, not NaN (exp2(-inf - -inf)); the other rows are unaffected."""
    b, h, t, d, scale = 1, 2, 70, 8, 0.35
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    if case.startswith("q-row"):  # k > 0, so q row 45 = -inf scores -inf against every key
        k, row = k.abs() + 0.1, 45
        q[0, 1, row] = float("-inf")
    else:  # q > 0 and key 0 = -inf: causal row 0 sees key 0 only
        q, row = q.abs() + 0.1, 0
        k[0, 1, 0] = float("-inf")
    out, dq, _dk, dv = _check_like_torch([q, k, v], case != "q-row", scale)
    assert (out[0, 1, row] == 0).all(), out[0, 1, row]
    if case.startswith("q-row"):
        assert (dq[0, 1, row] == 0).all() and dv.isfinite().all(), (dq[0, 1, row], dv.isnan().sum())


# --- Zero-size inputs: empty (or, with no keys, zero) outputs, no crash -----------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 0)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_zero_size(shape, affine):
    import torch.nn.functional as F

    from chargpt_kernels import triton_layer_norm

    x = torch.randn(*shape, device=DEVICE)
    params = [torch.randn(shape[1], device=DEVICE) for _ in range(2)] if affine else [None, None]
    inputs = [t for t in (x, *params) if t is not None]

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in inputs]
        w, b = (leaves[1], leaves[2]) if affine else (None, None)
        y = fn(leaves[0], w, b)
        return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))

    got = run(lambda x, w, b: triton_layer_norm.layer_norm(x, w, b, 1e-5))
    want = run(lambda x, w, b: F.layer_norm(x, (shape[1],), w, b, 1e-5))
    for what, a, e in zip(("y", "dx", "dw", "db"), got, want):
        assert a.shape == e.shape and torch.equal(a, e), f"{what}: {a} != {e}"


@pytest.mark.parametrize("q_shape,kv_shape", [((0, 2, 5, 8), (0, 2, 5, 8)), ((1, 0, 5, 8), (1, 0, 5, 8)),
                                              ((1, 2, 0, 8), (1, 2, 5, 8)), ((1, 2, 5, 8), (1, 2, 0, 8)),
                                              ((1, 2, 5, 0), (1, 2, 5, 0))],
                         ids=["B=0", "H=0", "Tq=0", "Tk=0", "D=0"])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_attention_zero_size(q_shape, kv_shape, is_causal):
    """Empty in, empty out; with no keys (Tk = 0) every row sees no key, so the output and dq are 0, like torch. The
    composed reference is the truth: torch 2.11's own CPU sdpa dies of SIGFPE at H = 0."""
    from chargpt_kernels import reference, triton_attention

    inputs = [torch.randn(*shape, device=DEVICE) for shape in (q_shape, kv_shape, kv_shape)]
    got, grad = _grads(lambda q, k, v: triton_attention.attention(q, k, v, is_causal, 0.0, 0.3), inputs)
    want, _ = _grads(lambda q, k, v: reference.attention(q, k, v, is_causal, 0.0, 0.3), inputs, grad)
    for what, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == e.shape and torch.equal(a, e), f"{what}: {a} != {e}"
