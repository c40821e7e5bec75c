"""The `ext` backend's CPU norm kernels in bfloat16 and float16: layer_norm, rms_norm and add_norm (both norms,
dropout off and on, under the spec mask) forward and backward against the float64 reference at 16-bit tolerances, on
odd N, strided inputs and every affine combination; NaN/inf as torch propagates them; rounding bit for bit like
torch's .to() (ties, overflow, subnormals); float32 statistics; thread-count independence; auto's choice.

The kernels widen rows into float32 scratch, run the float32 routines and round the results back (csrc/cpu/
layer_norm.cpp, conversions in csrc/cpu/vec.h), so what is judged here is that layer and the dtypes it hands on."""

import pytest
import torch
import torch.nn.functional as F
from test_ext_norms import spec_mask
from test_norms import add_norm_case

import chargpt_kernels
from chargpt_kernels import backends, reference
from chargpt_kernels.testing import assert_close, check_against_reference, layer_norm_inputs

from conftest import require_backend

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
N_ODD = [1, 7, 384, 1000, 4099]
OPS = ("layer_norm", "rms_norm", "add_norm")


@pytest.fixture(scope="module", autouse=True)
def ext():
    require_backend("ext", "cpu", ops=OPS)
    from chargpt_kernels import ext_layer_norm  # noqa: F401 (registers the fakes)


@pytest.mark.parametrize("dtype", HALF)
def test_auto_picks_ext_for_16_bit_norms_on_cpu(dtype):
    for op in OPS:
        assert backends.backend_for("auto", op, "cpu", dtype) == "ext", op
        assert backends.backend_for("ext", op, "cpu", dtype) == "ext", op


# --- against the float64 reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["wb", "w", "b", "none"])
@pytest.mark.parametrize("n", N_ODD)
def test_layer_norm_matches_reference(dtype, weight, bias, n):
    x, w, b = layer_norm_inputs((3, 5), n, "cpu", dtype, weight, bias, seed=n, contiguous=(n % 2 == 0))
    y = check_against_reference(lambda x, w, b: chargpt_kernels.layer_norm(x, (n,), w, b, eps=1e-5, backend="ext"),
                                lambda x, w, b: reference.layer_norm(x, w, b, eps=1e-5), (x, w, b), dtype,
                                f"layer_norm {dtype} n={n}")
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("weight", [True, False], ids=["w", "none"])
@pytest.mark.parametrize("n", N_ODD)
def test_rms_norm_matches_reference(dtype, weight, n):
    x, w, _ = layer_norm_inputs((3, 5), n, "cpu", dtype, weight, False, seed=n, contiguous=(n % 2 == 0))
    y = check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="ext"),
                                lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w), dtype, f"rms_norm {dtype} n={n}")
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("norm,weight,bias", [("layer", True, True), ("layer", True, False), ("layer", False, True),
                                              ("layer", False, False), ("rms", True, False), ("rms", False, False)],
                         ids=["layer-wb", "layer-w", "layer-b", "layer-none", "rms-w", "rms-none"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("n", N_ODD)
def test_add_norm_matches_reference(dtype, norm, weight, bias, dropout_p, n):
    """Outputs y and h and the gradients of x, residual, weight and bias; with dropout, under the spec mask (the
    backward regenerates it). x is a strided slice for odd n (test_norms' case)."""
    inputs, fused, expected = add_norm_case("ext", "cpu", dtype, n, norm, weight, bias, dropout_p, seed=n)
    out = check_against_reference(fused, expected, inputs, dtype, f"add_norm {norm} {dtype} p={dropout_p} n={n}")
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_strided_and_expanded_inputs(dtype, norm):
    """x rows with a stride wider than N (a column slice) and a transposed x (copied once), residual expanded along
    rows (stride 0), weight a strided slice: each read as its layout says."""
    gen = torch.Generator().manual_seed(7)
    n = 56
    wide = (torch.randn(9, 3 * n, generator=gen) * 2 + 0.5).to(dtype)
    x = wide[:, n:2 * n].requires_grad_()  # row stride 3n, unit column stride
    xt = (torch.randn(n, 9, generator=gen) * 2 + 0.5).to(dtype).t().requires_grad_()  # strides (1, 9)
    residual_row = torch.randn(1, n, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(2 * n, generator=gen) + 1).to(dtype)[::2].requires_grad_()
    b = torch.randn(n, generator=gen).to(dtype).requires_grad_() if norm == "layer" else None

    def fused(x, residual_row, w, b):
        y, h = chargpt_kernels.add_norm(x, residual_row.expand(9, n), (n,), w, b, 1e-5, norm, 0.2, backend="ext")
        return torch.cat([y, h], -1)

    def expected(x, residual_row, w, b):
        mask = spec_mask(reference.new_dropout_seed(x.device), (9, n), 0.2)
        return torch.cat(reference.add_norm(x, residual_row.expand(9, n), w, b, 1e-5, norm, 0.2, dropout_mask=mask),
                         -1)

    for xi in (x, xt):
        check_against_reference(fused, expected, (xi, residual_row, w, b), dtype, f"strided add_norm {norm}")
        if norm == "layer":
            check_against_reference(lambda x, w, b: chargpt_kernels.layer_norm(x, (n,), w, b, backend="ext"),
                                    lambda x, w, b: reference.layer_norm(x, w, b), (xi, w, b), dtype,
                                    "strided layer_norm")
        else:
            check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="ext"),
                                    lambda x, w: reference.rms_norm(x, w, 1e-6), (xi, w), dtype, "strided rms_norm")


# --- non-finite values -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_norm-layer", "add_norm-rms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_propagate_like_torch(dtype, op, value):
    """One non-finite x in row 1 (add_norm: where dropout drops it, x * 0 keeping NaN as torch's dropout does): NaN
    and inf land where the float64 reference puts them, in outputs and gradients, and where torch's own 16-bit op
    puts them; the other rows stay finite."""
    n = 40
    x, w, b = layer_norm_inputs((4,), n, "cpu", dtype, True, op != "rms_norm" and op != "add_norm-rms", seed=3,
                                requires_grad=False)
    residual = layer_norm_inputs((4,), n, "cpu", dtype, False, False, seed=4, requires_grad=False)[0]
    torch.manual_seed(0)
    mask = spec_mask(reference.new_dropout_seed("cpu"), (4, n), 0.5)
    col = int((~mask[1]).nonzero()[0])
    x = x.clone()
    x[1, col] = value
    for t in (x, residual, w, b):
        if t is not None:
            t.requires_grad_()
    if op == "layer_norm":
        out = check_against_reference(lambda x, w, b: chargpt_kernels.layer_norm(x, (n,), w, b, backend="ext"),
                                      lambda x, w, b: reference.layer_norm(x, w, b), (x, w, b), dtype, op)
        torch_out = F.layer_norm(x, (n,), w, b)
    elif op == "rms_norm":
        out = check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="ext"),
                                      lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w), dtype, op)
        torch_out = F.rms_norm(x, (n,), w, 1e-6)
    else:
        norm = op.split("-")[1]

        def fused(x, residual, w, b):
            return torch.cat(chargpt_kernels.add_norm(x, residual, (n,), w, b, 1e-5, norm, 0.5, backend="ext"), -1)

        def expected(x, residual, w, b):
            keep = spec_mask(reference.new_dropout_seed(x.device), x.shape, 0.5)
            return torch.cat(reference.add_norm(x, residual, w, b, 1e-5, norm, 0.5, dropout_mask=keep), -1)

        out = check_against_reference(fused, expected, (x, residual, w, b), dtype, op)
        h = residual + x * mask / 0.5  # torch's own ops, in the 16-bit dtype
        torch_out = torch.cat([F.layer_norm(h, (n,), w, b) if norm == "layer" else F.rms_norm(h, (n,), w, 1e-5), h],
                              -1)
        assert torch.isnan(out[1, n + col])  # h: dropped, but x * 0 is NaN
    assert torch.equal(out.isnan(), torch_out.isnan()), f"{op}: NaN where torch's {dtype} op has none, or not"
    assert torch.equal(out.isinf(), torch_out.isinf())
    assert torch.isfinite(out[[0, 2, 3]]).all()


# --- rounding and dtypes ---------------------------------------------------------------------------------------------

def _magnitudes(dtype, n, seed):
    """Rows of random values at scales across the dtype's range: subnormal, ~1 and near overflow (their sums then
    round to nearest even, overflow to inf and stay subnormal), each bf16/fp16-exact."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    scales = torch.tensor([info.smallest_normal * 0.3, info.smallest_normal * 4, 1.0, 3.0, info.max * 0.45])
    values = torch.randn(len(scales), n, generator=gen, dtype=torch.float64) * scales.double()[:, None]
    return values.clamp(-0.99 * info.max, 0.99 * info.max).to(dtype)  # finite inputs; their sums may overflow


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n", [7, 16, 1000])
def test_outputs_round_like_torch(dtype, n):
    """h = residual + x is one float32 add rounded to the dtype: bit for bit torch's (x.float() + r.float()).to(dtype),
    ties to even, overflow to inf and subnormals included. y with weight 0 is the bias itself, subnormal ones too."""
    x, residual = _magnitudes(dtype, n, seed=1), _magnitudes(dtype, n, seed=2)
    for norm in ("layer", "rms"):
        y, h = chargpt_kernels.add_norm(x, residual, (n,), norm=norm, backend="ext")
        want = (x.float() + residual.float()).to(dtype)
        assert torch.equal(h.view(torch.int16), want.view(torch.int16)), f"{norm}: h rounded unlike torch"
    bias = _magnitudes(dtype, n, seed=3)[[0, 1, 2]]  # subnormal, small normal and ~1 biases
    for row in bias:
        y = chargpt_kernels.layer_norm(x[2:3].expand(4, n), (n,), torch.zeros(n, dtype=dtype), row, backend="ext")
        assert torch.equal(y, row.expand(4, n))  # by value: 0 * xhat + (-0.0) is +0.0, as in any float math


@pytest.mark.parametrize("dtype", HALF)
def test_raw_ops_keep_statistics_in_float32(dtype):
    """y, h, dx and dweight/dbias in the input dtype; mean and rstd float32, equal to float64 statistics of x."""
    ops = torch.ops.chargpt
    x, w, b = layer_norm_inputs((6,), 33, "cpu", dtype, True, True, seed=1, requires_grad=False)
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    dx, dw, db = ops.layer_norm_bwd(torch.randn(6, 33).to(dtype), x, w, mean, rstd)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    _, rstd = ops.rms_norm_fwd(x, w, 1e-6)
    assert rstd.dtype == torch.float32
    for norm, bias in (("layer", b), ("rms", None)):
        y, h, mean, rstd = ops.add_norm_fwd(x, x, w, bias, 1e-5, norm, 0.25, torch.tensor([3]))
        assert y.dtype == h.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
        grads = ops.add_norm_bwd(torch.randn(6, 33).to(dtype), None, h, w, mean, rstd, norm, 0.25, torch.tensor([3]))
        assert all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("dtype", HALF)
def test_opcheck(dtype):
    """Schemas, fakes (16-bit outputs, float32 statistics) and autograd registration agree with the kernels."""
    x, w, b = layer_norm_inputs((5,), 40, "cpu", dtype, True, True, seed=0)
    residual = layer_norm_inputs((5,), 40, "cpu", dtype, False, False, seed=2)[0]
    seed = torch.tensor([12345])
    torch.library.opcheck(torch.ops.chargpt.layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.chargpt.rms_norm_fwd, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.chargpt.add_norm_fwd, (x, residual, w, b, 1e-5, "layer", 0.25, seed))
    with torch.no_grad():
        _, mean, rstd = torch.ops.chargpt.layer_norm_fwd(x, w, b, 1e-5)
        _, h, hmean, hrstd = torch.ops.chargpt.add_norm_fwd(x, residual, w, None, 1e-5, "rms", 0.25, seed)
    g = torch.randn(5, 40).to(dtype)
    torch.library.opcheck(torch.ops.chargpt.layer_norm_bwd, (g, x.detach(), w.detach(), mean, rstd))
    torch.library.opcheck(torch.ops.chargpt.add_norm_bwd, (g, g, h, w.detach(), hmean, hrstd, "rms", 0.25, seed))


def test_mixed_dtypes_raise():
    ops = torch.ops.chargpt
    x = torch.randn(4, 8).bfloat16()
    cases = [
        (lambda: ops.layer_norm_fwd(x, torch.ones(8), None, 1e-5), "weight is Float but x/q is BFloat16"),
        (lambda: ops.rms_norm_fwd(x.half(), x[0], 1e-5), "weight is BFloat16 but x/q is Half"),
        (lambda: ops.add_norm_fwd(x, x.float(), None, None, 1e-5, "layer", 0.0, None), "residual is Float"),
        (lambda: ops.layer_norm_bwd(x, x, None, torch.zeros(4).bfloat16(), torch.ones(4)), "mean must be float32"),
        (lambda: ops.layer_norm_fwd(x.double(), None, None, 1e-5), "supports float32, bfloat16 and float16"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_modules_in_bf16_match_torchs():
    """chargpt_kernels.LayerNorm/RMSNorm cast to bfloat16 (auto picks ext) against float64 math on the same parameters,
    and against torch's own bf16 modules (which are as far from float64 as a bf16 result is)."""
    torch.manual_seed(0)
    x = (torch.randn(8, 96) * 2 + 0.5).bfloat16()
    for fused, ref in ((chargpt_kernels.LayerNorm(96), torch.nn.LayerNorm(96)), (chargpt_kernels.RMSNorm(96, eps=1e-6),
                                                                          torch.nn.RMSNorm(96, eps=1e-6))):
        with torch.no_grad():
            ref.weight.normal_()
        fused.load_state_dict(ref.state_dict())
        fused, ref = fused.bfloat16(), ref.bfloat16()
        y = fused(x)
        assert y.dtype == torch.bfloat16
        params = [p.double() for p in ref.parameters()]
        if isinstance(ref, torch.nn.LayerNorm):
            want = F.layer_norm(x.double(), (96,), *params)
        else:
            want = F.rms_norm(x.double(), (96,), *params, eps=1e-6)
        assert_close(y, want, torch.bfloat16, type(ref).__name__)
        assert_close(y, ref(x).double(), torch.bfloat16, f"{type(ref).__name__} vs torch's bf16")
