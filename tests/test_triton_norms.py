"""The triton backend's rms_norm and add_norm beyond tests/test_norms.py (which holds every backend to the float64
reference on the common cases): dropout on swept rows (N > 4096: h is written, then read back), every affine
combination under dropout, NaN and inf, constant rows, N up to 65,536, many rows (several programs' dW/dB
partials), strided and expanded inputs, one output unused, zero-size inputs, eps None, double backward.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), on CUDA when there is one; shapes stay small.
"""

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close, check_against_reference, layer_norm_inputs

from conftest import require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = torch.float32


@pytest.fixture(scope="module", autouse=True)
def triton_norms():
    require_backend("triton", DEVICE, ops=("rms_norm", "add_norm"))


def spec_mask(seed, shape, p):
    """The keep-mask chargpt_kernels.reference specifies for add_norm: element (i, j) of the (M, N) rows at offset
    i*N + j."""
    n = shape[-1]
    return reference.dropout_keep_mask(int(seed), 1, 1, torch.Size(shape[:-1]).numel(), n, p, DEVICE).view(shape)


def add_norm_vs_reference(x, residual, w, b, norm, p, eps=1e-5, dtype=FP32, what="", pick=None):
    """chargpt_kernels.add_norm on triton against the float64 reference under the spec mask, outputs and gradients. pick
    None compares y and h side by side; 0 or 1 compares y or h alone (the other output unused)."""
    def both(out):
        return torch.cat(out, -1) if pick is None else out[pick]

    def fused(x, residual, w, b):
        return both(chargpt_kernels.add_norm(x, residual, x.shape[-1:], w, b, eps, norm, p, backend="triton"))

    def expected(x, residual, w, b):
        mask = spec_mask(reference.new_dropout_seed(x.device), x.shape, p) if p > 0 else None
        return both(reference.add_norm(x, residual, w, b, eps, norm, p, dropout_mask=mask))

    return check_against_reference(fused, expected, (x, residual, w, b), dtype, what)


def inputs(rows, n, dtype=FP32, weight=True, bias=True, seed=0, requires_grad=True):
    x, w, b = layer_norm_inputs((rows,), n, DEVICE, dtype, weight, bias, seed=seed, requires_grad=requires_grad)
    residual = layer_norm_inputs((rows,), n, DEVICE, dtype, False, False, seed=seed + 1,
                                 requires_grad=requires_grad)[0]
    return x, residual, w, b


# --- dropout and affine ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,weight,bias", [("layer", True, True), ("layer", True, False), ("layer", False, True),
                                              ("layer", False, False), ("rms", True, False), ("rms", False, False)],
                         ids=["layer-wb", "layer-w", "layer-b", "layer-none", "rms-w", "rms-none"])
@pytest.mark.parametrize("n", [7, 4099], ids=["one-block", "swept"])
def test_add_norm_dropout_every_affine(norm, weight, bias, n):
    """Outputs and all four gradients equal the reference's under the spec mask, on one-block and swept rows."""
    x, residual, w, b = inputs(3, n, FP32, weight, bias, seed=n)
    add_norm_vs_reference(x, residual, w, b, norm, 0.25, what=f"{norm} w={weight} b={bias} n={n}")


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", [1000, 4099])
def test_add_norm_dropout_float16(norm, n):
    x, residual, w, b = inputs(3, n, torch.float16, True, norm == "layer", seed=n + 3)
    add_norm_vs_reference(x, residual, w, b, norm, 0.3, dtype=torch.float16, what=f"fp16 {norm} n={n}")


@pytest.mark.parametrize("n", [65536, 65521])
def test_rows_up_to_65536(n):
    x, residual, w, b = inputs(2, n, seed=n)
    add_norm_vs_reference(x, residual, w, b, "layer", 0.1, what=f"add_norm layer n={n}")
    add_norm_vs_reference(x, residual, w, None, "rms", 0.0, what=f"add_norm rms n={n}")
    check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="triton"),
                            lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w), FP32, f"rms_norm n={n}")


def test_rows_over_65536_raise():
    from chargpt_kernels import triton_layer_norm

    x = torch.zeros(1, 65537, device=DEVICE)
    with pytest.raises(ValueError, match="up to 65536"):
        triton_layer_norm.rms_norm(x, None, 1e-6)
    with pytest.raises(ValueError, match="up to 65536"):
        triton_layer_norm.add_norm(x, x, None, None, 1e-5, "layer", 0.0)


@pytest.mark.parametrize("n", [1000, 4099], ids=["one-block", "swept"])
def test_many_rows_sum_the_partials_of_several_programs(n):
    """Enough rows for several backward programs, each with its own dW/dB partial row; the same call twice gives
    bit-identical gradients (fixed reduction order, no atomics)."""
    rows = 150 if n < 4096 else 24  # 13 and 12 backward programs (16 at most on CPU), uneven last ones
    x, residual, w, b = inputs(rows, n, seed=11)
    add_norm_vs_reference(x, residual, w, b, "layer", 0.2, what=f"many rows layer n={n}")
    add_norm_vs_reference(x, residual, w, None, "rms", 0.0, what=f"many rows rms n={n}")
    grad = torch.randn(rows, 2 * n, generator=torch.Generator().manual_seed(12)).to(DEVICE)

    def run():
        torch.manual_seed(0)
        out = torch.cat(chargpt_kernels.add_norm(x, residual, (n,), w, b, 1e-5, "layer", 0.2, backend="triton"), -1)
        return [out, *torch.autograd.grad(out, (x, residual, w, b), grad)]

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_without_dropout_dx_is_dresidual(norm):
    x, residual, w, b = inputs(5, 40, seed=13, bias=norm == "layer")
    y, h = chargpt_kernels.add_norm(x, residual, (40,), w, b, 1e-5, norm, 0.0, backend="triton")
    dx, dresidual = torch.autograd.grad(torch.cat([y, h], -1), (x, residual), torch.randn(5, 80, device=DEVICE))
    assert torch.equal(dx, dresidual)


# --- values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n", [768, 4099])
def test_constant_rows_are_exact(n, p):
    """h constant along a row: mean exactly its value, variance 0, so y is exactly bias even at eps=1e-12 (BERT)."""
    residual = torch.full((3, n), 0.1, device=DEVICE)
    residual[1] = -7.3
    x = torch.zeros(3, n, device=DEVICE)
    w, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    y, h = chargpt_kernels.add_norm(x, residual, (n,), w, b, eps=1e-12, norm="layer", dropout_p=p, backend="triton")
    torch.testing.assert_close(h, residual, rtol=0, atol=0)
    torch.testing.assert_close(y, b.expand(3, n), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", [40, 4099], ids=["one-block", "swept"])
def test_non_finite_values_propagate_even_where_dropout_drops_them(n, norm, value):
    """A NaN or inf in x where dropout drops it still reaches h (NaN * 0 and inf * 0 are NaN, as in torch's
    x * mask / (1 - p)) and makes its row of y non-finite; other rows are untouched. Gradients are NaN exactly where
    the float64 reference has them."""
    x, residual, w, b = inputs(4, n, seed=3, bias=norm == "layer", requires_grad=False)
    torch.manual_seed(0)
    mask = spec_mask(reference.new_dropout_seed(DEVICE), (4, n), 0.5)
    dropped = int((~mask[1]).nonzero()[0])
    x = x.clone()
    x[1, dropped] = value
    for t in (x, residual, w, b):
        if t is not None:
            t.requires_grad_()
    out = add_norm_vs_reference(x, residual, w, b, norm, 0.5, what=f"{value} {norm} n={n}")
    y, h = out[:, :n], out[:, n:]
    assert torch.isnan(h[1, dropped]) and torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2, 3]]).all() and torch.isfinite(h[[0, 2, 3]]).all()
    x_kept = x.detach().clone()
    x_kept[1, 5] = value
    y = check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="triton"),
                                lambda x, w: reference.rms_norm(x, w, 1e-6), (x_kept.requires_grad_(), w), FP32,
                                f"rms_norm {value} n={n}")
    assert torch.isfinite(y[[0, 2, 3]]).all()


def test_eps_none_is_torchs_default():
    from chargpt_kernels import triton_layer_norm

    x = layer_norm_inputs((4,), 16, DEVICE, FP32, False, False, seed=14, requires_grad=False)[0] * 1e-4
    want = F.rms_norm(x.double(), (16,), eps=torch.finfo(FP32).eps)
    assert_close(triton_layer_norm.rms_norm(x, None, None), want, FP32, "rms_norm eps None")
    y, h = triton_layer_norm.add_norm(x, torch.zeros_like(x), None, None, None, "rms", 0.0)
    assert_close(y, want, FP32, "add_norm rms eps None")


# --- layouts and gradient paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", [56, 4099], ids=["one-block", "swept"])
def test_strided_and_expanded_inputs(norm, n):
    """x with a non-unit last stride (a transpose), residual expanded along rows (stride 0), weight a strided
    slice; rms_norm of the same x and weight."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(n, 3, generator=gen) * 2 + 0.5).t().to(DEVICE).requires_grad_()  # (3, n), strides (1, 3)
    residual_row = torch.randn(1, n, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(2 * n, generator=gen).to(DEVICE)[::2].requires_grad_()
    b = torch.randn(n, generator=gen).to(DEVICE).requires_grad_() if norm == "layer" else None

    def fused(x, residual_row, w, b):
        y, h = chargpt_kernels.add_norm(x, residual_row.expand(3, n), (n,), w, b, 1e-5, norm, 0.2, backend="triton")
        return torch.cat([y, h], -1)

    def expected(x, residual_row, w, b):
        mask = spec_mask(reference.new_dropout_seed(x.device), (3, n), 0.2)
        return torch.cat(reference.add_norm(x, residual_row.expand(3, n), w, b, 1e-5, norm, 0.2, dropout_mask=mask),
                         -1)

    check_against_reference(fused, expected, (x, residual_row, w, b), FP32, f"strided {norm} n={n}")
    check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="triton"),
                            lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w), FP32, f"strided rms_norm n={n}")


@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("n", [48, 4099], ids=["one-block", "swept"])
def test_gradients_when_only_one_output_is_used(used, dropout_p, n):
    """Only y used: no gradient of h is read. Only h used: the norm adds nothing, weight and bias get no gradient,
    and a NaN row of h leaves x's and residual's gradients finite (no 0 * NaN from an unused y)."""
    x, residual, w, b = inputs(5, n, seed=5)
    pick = 0 if used == "y" else 1
    if used == "h":  # h does not depend on weight and bias: they are plain values here
        w, b = w.detach(), b.detach()
    add_norm_vs_reference(x, residual, w, b, "layer", dropout_p, what=f"only {used} n={n}", pick=pick)
    if used == "h":
        w, b = w.requires_grad_(), b.requires_grad_()
        residual_nan = residual.detach().clone()
        residual_nan[2, 0] = float("nan")
        residual_nan.requires_grad_()
        y, h = chargpt_kernels.add_norm(x, residual_nan, (n,), w, b, 1e-5, "layer", dropout_p, backend="triton")
        assert torch.isnan(y[2]).all()
        grads = torch.autograd.grad(h.sum(), (x, residual_nan, w, b), allow_unused=True)
        assert grads[2] is None and grads[3] is None
        assert torch.isfinite(grads[0]).all() and torch.equal(grads[1], torch.ones_like(h))


@pytest.mark.parametrize("op", ["rms_norm", "add_norm_x", "add_norm_residual", "add_norm_only_h"])
def test_double_backward_is_refused(op):
    """A fused backward is not differentiable: asking for a second derivative raises, never a silent 0."""
    x, residual, w, _ = inputs(3, 24, seed=1, bias=False)
    if op == "rms_norm":
        out = chargpt_kernels.rms_norm(x, (24,), w, backend="triton")
    elif op == "add_norm_only_h":  # squared, so that h's gradient (and through the mask, x's) depends on x
        out = chargpt_kernels.add_norm(x, residual, (24,), w, None, 1e-5, "layer", 0.1, backend="triton")[1].square()
    else:
        out = torch.cat(chargpt_kernels.add_norm(x, residual, (24,), w, None, 1e-5, "layer", 0.1, backend="triton"), -1)
    leaf = residual if op == "add_norm_residual" else x
    (g,) = torch.autograd.grad((out * torch.randn(out.shape, device=DEVICE)).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(g.square().sum(), leaf)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 0)], ids=lambda s: "x".join(map(str, s)))
def test_zero_size(shape):
    """Called directly (the public API routes empty inputs to the reference): empty outputs, zero dW/dB, like torch."""
    from chargpt_kernels import triton_layer_norm

    n = shape[1]
    x, residual = (torch.randn(*shape, device=DEVICE) for _ in range(2))
    w, b = (torch.randn(n, device=DEVICE) for _ in range(2))

    def run(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    cases = [
        (lambda x, w: triton_layer_norm.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (n,), w, 1e-6), (x, w)),
        (lambda x, r, w, b: torch.cat(triton_layer_norm.add_norm(x, r, w, b, 1e-5, "layer", 0.1), -1),
         lambda x, r, w, b: torch.cat(reference.add_norm(x, r, w, b, 1e-5, "layer"), -1), (x, residual, w, b)),
    ]
    for fused, expected, args in cases:
        for what, got, want in zip(("out", "d0", "d1", "d2", "d3"), run(fused, args), run(expected, args)):
            assert got.shape == want.shape and torch.equal(got, want), f"{what}: {got} != {want}"
