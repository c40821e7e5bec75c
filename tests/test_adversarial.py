"""Inputs a real model can produce that easy tests never try, on every backend, judged by a float64 truth.

The truth is chargpt_kernels.reference (or torch) evaluated in float64. Where torch's own float32 answer is wrong, the
comment says so, and the kernels are held to float64, not to torch. Cases that could crash the process (exotic
strides reaching C++) run in a subprocess, so a crash fails one test instead of killing the run.
"""

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close, attention_inputs, layer_norm_inputs

from chargpt_helpers import checkout_env
from conftest import FUSED_BACKENDS, require_backend

ALL_BACKENDS = ("eager",) + FUSED_BACKENDS
FP32 = torch.float32


def attention_vs_float64(backend, q, k, v, is_causal=True, scale=None, what=""):
    """Output and dq, dk, dv of causal_attention on `backend` against the float64 reference."""
    out = chargpt_kernels.causal_attention(q, k, v, scale=scale, backend=backend) if is_causal else \
        _sdpa(backend, q, k, v, scale=scale)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.attention(q64, k64, v64, is_causal, 0.0, scale)
    assert_close(out, want, FP32, f"{backend} {what}: output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    leaves = [t for t in (q, k, v) if t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad)
    wanted = torch.autograd.grad(want, [t64 for t, t64 in zip((q, k, v), (q64, k64, v64)) if t.requires_grad],
                                 grad.double())
    for name, g, w in zip("qkv", got, wanted):
        assert_close(g, w, FP32, f"{backend} {what}: d{name}")


def _sdpa(backend, *args, **kwargs):
    with chargpt_kernels.use_backend(backend):
        return chargpt_kernels.scaled_dot_product_attention(*args, **kwargs)


# --- non-finite and extreme values -------------------------------------------------------------------------------

def row_by_row_attention(q, k, v):
    """Causal attention one query row at a time over exactly its visible keys: no product with a masked-out key is
    ever formed, so NaN reaches an output or gradient element only if that element depends on it mathematically.
    (The dense reference also multiplies masked weights, 0 * NaN = NaN, and so spreads NaN further.)"""
    rows = [torch.softmax(q[..., i:i + 1, :] @ k[..., :i + 1, :].transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
            @ v[..., :i + 1, :] for i in range(q.shape[-2])]
    return torch.cat(rows, dim=-2)


def assert_nan_semantics(actual, strict, dense, what):
    """Every element that depends on a NaN is NaN (none is swallowed); an element is NaN otherwise only where the
    dense float64 reference has NaN too (0 * NaN inside a tile, as torch's math does); the rest match float64."""
    lost = strict.isnan() & ~actual.isnan()
    assert not lost.any(), f"{what}: {int(lost.sum())} elements lost their NaN (e.g. at {lost.nonzero()[0].tolist()})"
    spread = actual.isnan() & ~strict.isnan() & ~dense.isnan()
    assert not spread.any(), f"{what}: {int(spread.sum())} elements are NaN where no reference has NaN"
    both = ~actual.isnan() & ~strict.isnan()
    assert_close(actual[both], strict[both], FP32, what)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_attention_non_finite_values_propagate(backend, where, value):
    """NaN in must be NaN out: in the output and in dq, dk, dv, wherever the math depends on the bad value."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 2, 70, 70, 16, "cpu", FP32, seed=3, requires_grad=False)
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    tensors[where][0, 1, 35, 3] = value
    q, k, v = (tensors[n].requires_grad_() for n in "qkv")
    out = chargpt_kernels.causal_attention(q, k, v, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    truths = []
    for fn in (row_by_row_attention, lambda q, k, v: reference.attention(q, k, v, True)):
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = fn(q64, k64, v64)
        truths.append((want, *torch.autograd.grad(want, (q64, k64, v64), grad.double())))
    for name, actual, strict, dense in zip(("output", "dq", "dk", "dv"), got, *truths):
        assert_nan_semantics(actual, strict, dense, f"{backend} {value} in {where}: {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("magnitude", [1e30, -1e30, 30.0, 1e-30])
def test_attention_extreme_magnitudes(backend, magnitude):
    """Scores of ~1e30 still fit float32 and the online softmax must not overflow: the weights become one-hot, and
    the output must match float64.

    Gradients are judged at scores of ~100 (q * 30). Far past that a flash backward, which recomputes each score
    and subtracts
    the saved log-sum-exp, loses precision as |score| * 2^-24 (the Triton kernels sum q.k in another order backward
    than forward): ~5e-3 relative in dv at scores of 1e4, the weights lost outright at 1e30. And dk = dS^T q * scale
    multiplies q by dS, a
    difference of nearly equal terms that float32 resolves to ~1e-7 and float64 to ~1e-16: dk is held to being
    finite only, and at 1e30 only the forward is judged."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 2, 33, 33, 16, "cpu", FP32, seed=4, requires_grad=False)
    q, k, v = (q * magnitude).requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = chargpt_kernels.causal_attention(q, k, v, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.attention(q64, k64, v64, True)
    assert_close(out, want, FP32, f"{backend} q * {magnitude}: output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    if abs(magnitude) <= 30.0:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        assert torch.isfinite(dk).all(), f"{backend} q * {magnitude}: dk not finite"
        want_dq, _, want_dv = torch.autograd.grad(want, (q64, k64, v64), grad.double())
        assert_close(dv, want_dv, FP32, f"{backend} q * {magnitude}: dv")
        assert_close(dq, want_dq, FP32, f"{backend} q * {magnitude}: dq")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e17], ids=["nan", "inf", "1e17"])
def test_layer_norm_extreme_rows(backend, value):
    """A non-finite row is NaN (and only that row); a row of ~1e17 normalizes like any other.

    The variance of a row is a sum of squares: up to ~1e17 it fits float32 (N * 1e34 < 3.4e38). A row of 1e30 does
    not: there torch's float32 F.layer_norm returns NaN, and so do the kernels (float64 would not overflow)."""
    require_backend(backend, "cpu")
    x, w, b = layer_norm_inputs((4,), 384, "cpu", FP32, True, True, seed=5, requires_grad=False)
    x = x.clone()
    if value == 1e17:
        x[1] *= value
    else:
        x[1, 17] = value
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = chargpt_kernels.layer_norm(x, (384,), w, b, backend=backend)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = F.layer_norm(x64, (384,), w64, b64)
    assert_close(y, want, FP32, f"{backend} y")
    if value != 1e17:
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    for name, g, r in zip(("dx", "dw", "db"), torch.autograd.grad(y, (x, w, b), grad),
                          torch.autograd.grad(want, (x64, w64, b64), grad.double())):
        assert_close(g, r, FP32, f"{backend} {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n", [768, 1000, 4099])
def test_layer_norm_constant_rows_are_exact(backend, n):
    """A constant row has mean exactly its value and variance 0: y must be exactly bias, even at eps=1e-12 (BERT),
    where any rounding left in x - mean is blown up by 1e6."""
    require_backend(backend, "cpu")
    x = torch.full((3, n), 0.1)
    x[1] = -7.3
    b = torch.randn(n)
    y = chargpt_kernels.layer_norm(x, (n,), torch.randn(n), b, eps=1e-12, backend=backend)
    torch.testing.assert_close(y, b.expand(3, n), rtol=0, atol=0)


# --- layouts -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_expanded_and_permuted_inputs(backend):
    """Stride-0 (expanded) k and v shared by every head, and a q whose last dim is not unit-stride."""
    require_backend(backend, "cpu")
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 3, 40, 19, generator=gen).transpose(-1, -2).requires_grad_()  # (B, H, T=19, D=40)
    k_base = torch.randn(1, 1, 23, 40, generator=gen).requires_grad_()
    v_base = torch.randn(2, 1, 23, 40, generator=gen).requires_grad_()
    k, v = k_base.expand(2, 3, 23, 40), v_base.expand(2, 3, 23, 40)
    out = _sdpa(backend, q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k_base, v_base))
    want = reference.attention(q64, k64.expand(2, 3, 23, 40), v64.expand(2, 3, 23, 40))
    assert_close(out, want, FP32, f"{backend} output")
    grad = torch.randn(out.shape, generator=gen)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k_base, v_base), grad),
                          torch.autograd.grad(want, (q64, k64, v64), grad.double())):
        assert_close(g, r, FP32, f"{backend} d{name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layer_norm_strided_weight_bias_and_expanded_rows(backend):
    require_backend(backend, "cpu")
    gen = torch.Generator().manual_seed(9)
    w_base, b_base = (torch.randn(128, generator=gen).requires_grad_() for _ in range(2))
    row = (torch.randn(1, 64, generator=gen) * 3 + 1).requires_grad_()
    x = row.expand(5, 64)  # stride 0 between rows
    y = chargpt_kernels.layer_norm(x, (64,), w_base[::2], b_base[1::2], backend=backend)
    row64, w64, b64 = (t.detach().double().requires_grad_() for t in (row, w_base, b_base))
    want = F.layer_norm(row64.expand(5, 64), (64,), w64[::2], b64[1::2])
    assert_close(y, want, FP32, f"{backend} y")
    grad = torch.randn(y.shape, generator=gen)
    for name, g, r in zip(("dx", "dw", "db"), torch.autograd.grad(y, (row, w_base, b_base), grad),
                          torch.autograd.grad(want, (row64, w64, b64), grad.double())):
        assert_close(g, r, FP32, f"{backend} {name}")


EXOTIC_LAYOUTS = """
import torch, chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close
torch.manual_seed(0)
base = torch.randn(2, 24, 16)
q = base.as_strided((2, 3, 20, 16), (384, 4, 16, 1))  # heads overlap: head h starts 4 rows after head h-1
k = torch.randn(2, 20, 16, 3).permute(0, 3, 1, 2)  # stride(1) == 1: heads are the innermost dim
v = torch.randn(2, 3, 16, 20).transpose(-1, -2)  # unit stride along T, not D
for causal in (True, False):
    with chargpt_kernels.use_backend("{backend}"):
        out = chargpt_kernels.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), causal), torch.float32, "exotic")
print("ok")
"""


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_exotic_layouts_in_a_subprocess(backend):
    """Overlapping heads and head-innermost strides: copied or handled, never read out of bounds, never a crash."""
    require_backend(backend, "cpu")
    env = checkout_env(OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", EXOTIC_LAYOUTS.replace("{backend}", backend)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


# --- shapes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("d", [1, 255, 256])
def test_attention_head_dim_edges(backend, d):
    require_backend(backend, "cpu")
    attention_vs_float64(backend, *attention_inputs(1, 1, 9, 9, d, "cpu", FP32, seed=d), what=f"D={d}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_head_dim_over_256(backend):
    """causal_attention refuses D = 257 with a message; the sdpa drop-in hands it to torch with one warning."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 1, 5, 5, 257, "cpu", FP32, seed=1)
    with pytest.raises(ValueError, match="head dim"):
        chargpt_kernels.causal_attention(q, k, v, backend=backend)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = _sdpa(backend, q, k, v, is_causal=True)
    assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True), FP32, "D")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tq,tk", [(1, 113), (7, 113), (113, 7), (113, 1)])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_attention_unequal_lengths(backend, tq, tk, is_causal):
    """Causal masks align top-left for Tq != Tk, as torch's do."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 2, tq, tk, 40, "cpu", FP32, seed=tq * tk)
    attention_vs_float64(backend, q, k, v, is_causal, what=f"Tq={tq} Tk={tk}")


ZERO_SIZE_ATTENTION = textwrap.dedent("""
    import torch, chargpt_kernels
    from chargpt_kernels import reference
    from chargpt_kernels.testing import assert_close, attention_inputs
    FP32 = torch.float32
    # name: (B, Hq, Hk, Tq, Tk, D, Dv)
    shapes = {"B=0": (0, 2, 2, 5, 5, 8, 8), "H=0": (2, 0, 0, 5, 5, 8, 8), "Tq=0": (1, 2, 2, 0, 5, 8, 8),
              "Tk=0": (1, 2, 2, 5, 0, 8, 8), "D=0": (1, 2, 2, 5, 5, 0, 0), "D=0 Dv=3": (1, 2, 2, 5, 5, 0, 3),
              "H=0 GQA": (2, 0, 0, 5, 5, 8, 8), "Tk=0 GQA": (1, 4, 2, 5, 0, 8, 8)}
    with chargpt_kernels.use_backend("{backend}"):
        for name, (b, hq, hk, tq, tk, d, dv) in shapes.items():
            q, k, _ = attention_inputs(b, hq, tq, tk, d, "cpu", FP32, seed=0, h_kv=hk)
            v = torch.randn(b, hk, tk, dv, requires_grad=True)
            scale = 1.0 if d == 0 else None  # no query features: every score is 0 whatever the scale
            for is_causal in (True, False):
                want = reference.attention(q.double(), k.double(), v.double(), is_causal, scale=scale)
                out = chargpt_kernels.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                                   enable_gqa=hk != hq)
                assert_close(out, want, FP32, f"sdpa {name} causal={is_causal}")
                out.sum().backward()  # differentiable, even when empty
                assert q.grad.shape == q.shape and v.grad.shape == v.shape
                if hk == hq:  # 3-D inputs take the folding path
                    flat = [t.flatten(0, 1) for t in (q, k, v)]
                    out = chargpt_kernels.scaled_dot_product_attention(*flat, is_causal=is_causal)
                    assert out.shape == want.flatten(0, 1).shape
            if d > 0:
                assert_close(chargpt_kernels.causal_attention(q, k, v, enable_gqa=hk != hq),
                             reference.attention(q.double(), k.double(), v.double(), True), FP32, f"causal {name}")
        mask = torch.ones(0, 1, 5, 5, dtype=torch.bool)  # an empty batch with a padding mask
        q, k, v = attention_inputs(0, 2, 5, 5, 8, "cpu", FP32, seed=1)
        assert chargpt_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask).shape == (0, 2, 5, 8)
        try:
            chargpt_kernels.causal_attention(*attention_inputs(1, 2, 5, 5, 0, "cpu", FP32, seed=2))
            raise AssertionError("causal_attention took D = 0")
        except ValueError as error:
            assert "head dim D must be in [1, 256], got 0" in str(error), error
        try:  # torch's own checks still apply to empty inputs
            chargpt_kernels.scaled_dot_product_attention(*attention_inputs(0, 4, 5, 5, 8, "cpu", FP32, seed=3,
                                                                           h_kv=3), enable_gqa=True)
            raise AssertionError("3 key heads for 4 query heads were taken")
        except RuntimeError:
            pass
    print("ok")
""")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_zero_size(backend):
    """B, H, Tq, Tk or D = 0 (with GQA, a mask, 3-D inputs): empty in, empty out, and no keys at all (Tk = 0) gives 0
    rows, as the float64 reference computes them; D = 0 gives torch's answer from the sdpa drop-in and a ValueError
    from causal_attention. In a fresh process: torch 2.11's own CPU sdpa dies of SIGFPE at H = 0, so a call that
    reaches it must fail this test, not end the run."""
    require_backend(backend, "cpu")
    run = subprocess.run([sys.executable, "-c", ZERO_SIZE_ATTENTION.replace("{backend}", backend)],
                         env=checkout_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), \
        f"exit {run.returncode}: {run.stderr[-2000:]}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 384), (3, 0), (0,)], ids=["M=0", "N=0", "empty-1d"])
def test_layer_norm_zero_size(backend, shape):
    require_backend(backend, "cpu")
    x = torch.randn(*shape, requires_grad=True)
    n = shape[-1]
    y = chargpt_kernels.layer_norm(x, (n,), torch.randn(n), torch.randn(n), backend=backend)
    assert y.shape == F.layer_norm(x, (n,)).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["ext"])
def test_attention_long_sequence_bounded_memory(backend):
    """T = 8192 in a fresh process: peak memory must grow by far less than one (T, T) float32 matrix (256 MB)."""
    require_backend(backend, "cpu")
    code = textwrap.dedent(f"""
        import resource, torch, chargpt_kernels
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        small = [torch.randn(1, 1, 256, 16, requires_grad=True) for _ in range(3)]
        chargpt_kernels.causal_attention(*small, backend="{backend}").sum().backward()
        before = peak_mb()
        q, k, v = (torch.randn(1, 1, 8192, 16, requires_grad=True) for _ in range(3))
        out = chargpt_kernels.causal_attention(q, k, v, backend="{backend}")
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
        print(peak_mb() - before)
    """)
    env = checkout_env(OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    grew_mb = float(run.stdout.strip().splitlines()[-1])
    assert grew_mb < 64, f"T=8192 attention grew peak memory by {grew_mb:.0f} MB: something is O(T^2)"


# --- scale, dropout and eps edges --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.3, 1e-8, 40.0])
def test_attention_finite_scale_edges(backend, scale):
    """scale 0 averages every visible value; negative scales prefer the least similar key."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 2, 21, 21, 16, "cpu", FP32, seed=11)
    attention_vs_float64(backend, q, k, v, scale=scale, what=f"scale={scale}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_attention_non_finite_scale(backend, scale):
    """causal_attention refuses a non-finite scale; the sdpa drop-in computes it like float64 (NaN). torch's float32
    sdpa returns 0 for scale=nan, which float64 does not."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 1, 6, 6, 8, "cpu", FP32, seed=2, requires_grad=False)
    with pytest.raises(ValueError, match="scale"):
        chargpt_kernels.causal_attention(q, k, v, scale=scale, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _sdpa(backend, q, k, v, scale=scale)
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), False, 0.0, scale), FP32, "scale")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("p", [1e-7, 0.5, 0.999])
def test_attention_dropout_edges_follow_the_mask_spec(backend, p):
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 2, 17, 17, 16, "cpu", FP32, seed=12)
    torch.manual_seed(5)
    out = chargpt_kernels.causal_attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(5)
    mask = reference.dropout_keep_mask(int(reference.new_dropout_seed("cpu")), 1, 2, 17, 17, p)
    want = reference.attention(q.double(), k.double(), v.double(), True, p, dropout_mask=mask)
    assert_close(out, want, FP32, f"{backend} p={p}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_dropout_out_of_range(backend):
    """causal_attention refuses p outside [0, 1); the drop-in gives torch's answer (p = 1: zeros; p > 1: its error)."""
    require_backend(backend, "cpu")
    q, k, v = attention_inputs(1, 1, 6, 6, 8, "cpu", FP32, seed=2, requires_grad=False)
    for p in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            chargpt_kernels.causal_attention(q, k, v, dropout_p=p, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(_sdpa(backend, q, k, v, dropout_p=1.0), torch.zeros_like(q))
        with pytest.raises(RuntimeError):
            _sdpa(backend, q, k, v, dropout_p=1.5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layer_norm_eps_edges(backend):
    """Tiny positive eps works; eps <= 0, inf or NaN raise (torch computes a number for eps = -0.5; README says so)."""
    require_backend(backend, "cpu")
    x, w, b = layer_norm_inputs((4,), 33, "cpu", FP32, True, True, seed=3, requires_grad=False)
    for eps in (1e-12, 1e-30, 10.0):
        assert_close(chargpt_kernels.layer_norm(x, (33,), w, b, eps, backend=backend),
                     F.layer_norm(x.double(), (33,), w.double(), b.double(), eps), FP32, f"eps={eps}")
    for eps in (0.0, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps"):
            chargpt_kernels.layer_norm(x, (33,), w, b, eps, backend=backend)


# --- dtype and device mixes, double backward ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dtype_and_device_mixes_raise(backend):
    require_backend(backend, "cpu")
    x, w, b = layer_norm_inputs((4,), 16, "cpu", FP32, True, True, seed=3, requires_grad=False)
    with pytest.raises(TypeError, match="float16"):
        chargpt_kernels.layer_norm(x, (16,), w.half(), b, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        chargpt_kernels.layer_norm(x, (16,), w, b.to("meta"), backend=backend)
    q, k, v = attention_inputs(1, 1, 4, 4, 8, "cpu", FP32, seed=0, requires_grad=False)
    with pytest.raises(TypeError, match="float64"):
        chargpt_kernels.causal_attention(q, k.double(), v, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        chargpt_kernels.causal_attention(q, k, v.long(), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "attention"])
def test_double_backward_is_right_or_refused(backend, op):
    """Second derivatives: eager (composed torch ops) gets them right; a fused backend raises, never a silent 0."""
    require_backend(backend, "cpu")
    if op == "layer_norm":
        x = layer_norm_inputs((3,), 24, "cpu", FP32, False, False, seed=1)[0]
        run = lambda x: chargpt_kernels.layer_norm(x, (24,), backend=backend)  # noqa: E731
    else:
        q, k, v = attention_inputs(1, 1, 6, 6, 8, "cpu", FP32, seed=1)
        x = q
        run = lambda q: chargpt_kernels.causal_attention(q, k, v, backend=backend)  # noqa: E731
    r = torch.randn(run(x).shape, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad((run(x) * r).sum(), x, create_graph=True)
    if backend == "eager":
        x64 = x.detach().double().requires_grad_()
        truth_run = (lambda t: F.layer_norm(t, (24,))) if op == "layer_norm" else \
            (lambda t: reference.attention(t, k.detach().double(), v.detach().double(), True))
        (g64,) = torch.autograd.grad((truth_run(x64) * r.double()).sum(), x64, create_graph=True)
        assert_close(torch.autograd.grad(g.square().sum(), x)[0], torch.autograd.grad(g64.square().sum(), x64)[0],
                     FP32, "second derivative")
        return
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.square().sum(), x)


def test_fallback_warns_once_per_reason_while_decoding(recwarn):
    """Token-by-token decoding with an unfused feature (GQA today) warns once, not once per new key length."""
    chargpt_kernels.api._warned.clear()
    for tk in range(1, 13):
        q = torch.randn(1, 4, 1, 8)
        kv = torch.randn(1, 2, tk, 8)
        chargpt_kernels.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    messages = [str(w.message) for w in recwarn if "chargpt_kernels.scaled_dot_product_attention" in str(w.message)]
    assert len(messages) <= 1, messages
    assert len(chargpt_kernels.api._warned) <= 1
    if messages:
        assert "GQA" in messages[0]


@pytest.mark.parametrize("shape", [(3, 8, 16), (2, 3, 4, 8, 16)], ids=["3-D", "5-D"])
def test_sdpa_keeps_enable_gqa_on_folded_inputs(shape):
    """3-D and 5-D inputs are folded to 4-D; enable_gqa must survive the fold (torch broadcasts k/v heads)."""
    q = torch.randn(*shape[:-3], 4, *shape[-2:])
    kv = torch.randn(*shape[:-3], 2, *shape[-2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = chargpt_kernels.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))
    assert math.prod(out.shape) == q.numel()
