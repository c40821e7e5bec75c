"""The `ext` backend's rms_norm and add_norm beyond tests/test_norms.py: the raw ops (opcheck, bad input), double
backward, constant rows, NaN, N up to 65,536, every gradient path, strided inputs, thread-count independence and
torch.compile. CPU kernels here; the CUDA kernels get theirs in tests/test_cuda_emulated.py."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close, check_against_reference, layer_norm_inputs

from chargpt_helpers import checkout_env
from conftest import require_backend

FP32 = torch.float32


@pytest.fixture(scope="module", autouse=True)
def ext():
    require_backend("ext", "cpu", ops=("rms_norm", "add_norm"))
    from chargpt_kernels import ext_layer_norm  # noqa: F401 (registers the fakes)


def spec_mask(seed, shape, p):
    """The keep-mask chargpt_kernels.reference specifies for add_norm: element (i, j) of the (M, N) rows at offset
    i*N + j."""
    n = shape[-1]
    return reference.dropout_keep_mask(int(seed), 1, 1, torch.Size(shape[:-1]).numel(), n, p).view(shape)


def add_norm_vs_reference(x, residual, w, b, norm, p, eps=1e-5, what=""):
    """chargpt_kernels.add_norm on ext against the float64 reference under the spec mask, outputs and gradients."""
    def fused(x, residual, w, b):
        return torch.cat(chargpt_kernels.add_norm(x, residual, x.shape[-1:], w, b, eps, norm, p, backend="ext"), -1)

    def expected(x, residual, w, b):
        mask = spec_mask(reference.new_dropout_seed(x.device), x.shape, p) if p > 0 else None
        return torch.cat(reference.add_norm(x, residual, w, b, eps, norm, p, dropout_mask=mask), -1)

    return check_against_reference(fused, expected, (x, residual, w, b), FP32, what)


# --- the raw ops ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [True, False], ids=["w", "none"])
def test_opcheck_rms_norm(weight):
    x, w, _ = layer_norm_inputs((5,), 40, "cpu", FP32, weight, False, seed=0)
    torch.library.opcheck(torch.ops.chargpt.rms_norm_fwd, (x, w, 1e-6))
    with torch.no_grad():
        _, rstd = torch.ops.chargpt.rms_norm_fwd(x, w, 1e-6)
    w_plain = None if w is None else w.detach()
    torch.library.opcheck(torch.ops.chargpt.rms_norm_bwd, (torch.randn(5, 40), x.detach(), w_plain, rstd))


@pytest.mark.parametrize("norm,bias", [("layer", True), ("rms", False)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("grad_h", [True, False], ids=["grad-h", "no-grad-h"])
def test_opcheck_add_norm(norm, bias, dropout_p, grad_h):
    x, w, b = layer_norm_inputs((6,), 33, "cpu", FP32, True, bias, seed=1)
    residual = layer_norm_inputs((6,), 33, "cpu", FP32, False, False, seed=2)[0]
    seed = torch.tensor([12345]) if dropout_p else None
    torch.library.opcheck(torch.ops.chargpt.add_norm_fwd, (x, residual, w, b, 1e-5, norm, dropout_p, seed))
    with torch.no_grad():
        _, h, mean, rstd = torch.ops.chargpt.add_norm_fwd(x, residual, w, b, 1e-5, norm, dropout_p, seed)
    args = (torch.randn(6, 33), torch.randn(6, 33) if grad_h else None, h, w.detach(), mean, rstd, norm, dropout_p,
            seed)
    torch.library.opcheck(torch.ops.chargpt.add_norm_bwd, args)


def test_bad_input_to_raw_ops_raises_runtime_error():
    ops = torch.ops.chargpt
    x, w = torch.randn(4, 8), torch.randn(8)
    seed = torch.tensor([1])
    cases = [
        (lambda: ops.rms_norm_fwd(x[0], w, 1e-5), "2-D"),
        (lambda: ops.rms_norm_fwd(x, torch.randn(7), 1e-5), "weight must have shape"),
        (lambda: ops.rms_norm_fwd(x, w, 0.0), "eps"),
        (lambda: ops.rms_norm_fwd(x.double(), None, 1e-5), "float32"),
        (lambda: ops.rms_norm_bwd(x, x, w, torch.ones(3)), "rstd must have shape"),
        (lambda: ops.add_norm_fwd(x, x[:2], w, None, 1e-5, "layer", 0.0, None), "residual has shape"),
        (lambda: ops.add_norm_fwd(x, x, w, None, 1e-5, "batch", 0.0, None), "norm must be"),
        (lambda: ops.add_norm_fwd(x, x, w, w, 1e-5, "rms", 0.0, None), "takes no bias"),
        (lambda: ops.add_norm_fwd(x, x, w, None, 1e-5, "layer", 0.5, None), "needs a seed"),
        (lambda: ops.add_norm_fwd(x, x, w, None, 1e-5, "layer", 1.0, seed), "dropout_p"),
        (lambda: ops.add_norm_fwd(x, x, w, None, 1e-5, "layer", 0.5, seed.int()), "int64"),
        (lambda: ops.add_norm_fwd(x, x.double(), w, None, 1e-5, "layer", 0.0, None), "residual is"),
        (lambda: ops.add_norm_bwd(x, x[:3], x, w, torch.zeros(4), torch.ones(4), "layer", 0.0, None), "grad_h"),
        (lambda: ops.add_norm_bwd(x, None, x, w, torch.zeros(3), torch.ones(4), "layer", 0.0, None), "mean must"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("op", ["rms_norm", "add_norm_x", "add_norm_residual"])
def test_double_backward_is_refused(op):
    """A fused backward is not differentiable: asking for a second derivative raises, never a silent 0."""
    x, w, _ = layer_norm_inputs((3,), 24, "cpu", FP32, True, False, seed=1)
    residual = layer_norm_inputs((3,), 24, "cpu", FP32, False, False, seed=2)[0]
    if op == "rms_norm":
        out = chargpt_kernels.rms_norm(x, (24,), w, backend="ext")
    else:
        out = torch.cat(chargpt_kernels.add_norm(x, residual, (24,), w, None, 1e-5, "layer", 0.1, backend="ext"), -1)
    leaf = residual if op == "add_norm_residual" else x
    (g,) = torch.autograd.grad((out * torch.randn(out.shape)).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(g.square().sum(), leaf)


# --- values ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [768, 1000, 4099])
def test_constant_rows_are_exact(n):
    """h constant along a row: mean exactly its value, variance 0, so y is exactly bias even at eps=1e-12 (BERT)."""
    residual = torch.full((3, n), 0.1)
    residual[1] = -7.3
    x = torch.zeros(3, n)
    w, b = torch.randn(n), torch.randn(n)
    y, h = chargpt_kernels.add_norm(x, residual, (n,), w, b, eps=1e-12, norm="layer", backend="ext")
    torch.testing.assert_close(h, residual, rtol=0, atol=0)
    torch.testing.assert_close(y, b.expand(3, n), rtol=0, atol=0)
    y = chargpt_kernels.layer_norm(residual, (n,), w, b, eps=1e-12, backend="ext")  # the shared statistics helper
    torch.testing.assert_close(y, b.expand(3, n), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_nan_propagates_even_where_dropout_drops_it(norm):
    """A NaN in x makes its row of h and y NaN (dropout multiplies it by 0, which keeps NaN, as torch's does); other
    rows are untouched. Gradients are NaN exactly where the float64 reference has them."""
    x, w, b = layer_norm_inputs((4,), 40, "cpu", FP32, True, norm == "layer", seed=3, requires_grad=False)
    residual = layer_norm_inputs((4,), 40, "cpu", FP32, False, False, seed=4, requires_grad=False)[0]
    torch.manual_seed(0)
    mask = spec_mask(reference.new_dropout_seed("cpu"), (4, 40), 0.5)
    dropped = int((~mask[1]).nonzero()[0])
    x = x.clone()
    x[1, dropped] = float("nan")
    for t in (x, residual, w, b):
        if t is not None:
            t.requires_grad_()
    out = add_norm_vs_reference(x, residual, w, b, norm, 0.5, what=f"NaN {norm}")
    y, h = out[:, :40], out[:, 40:]
    assert torch.isnan(h[1, dropped]) and torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2, 3]]).all() and torch.isfinite(h[[0, 2, 3]]).all()
    y = chargpt_kernels.rms_norm(x.detach(), (40,), w.detach(), backend="ext")
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("n", [65536, 65521])
def test_rows_up_to_65536(n):
    x, w, b = layer_norm_inputs((3,), n, "cpu", FP32, True, True, seed=n)
    residual = layer_norm_inputs((3,), n, "cpu", FP32, False, False, seed=n + 1)[0]
    add_norm_vs_reference(x, residual, w, b, "layer", 0.1, what=f"add_norm n={n}")
    check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, 1e-6, backend="ext"),
                            lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w), FP32, f"rms_norm n={n}")


@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradients_when_only_one_output_is_used(used, dropout_p):
    """Only y used: h's gradient is None (the kernel adds nothing); only h used: y's gradient is None."""
    x, w, b = layer_norm_inputs((5, 2), 48, "cpu", FP32, True, True, seed=5)
    residual = layer_norm_inputs((5, 2), 48, "cpu", FP32, False, False, seed=6)[0]
    pick = 0 if used == "y" else 1

    def fused(x, residual, w, b):
        return chargpt_kernels.add_norm(x, residual, (48,), w, b, 1e-5, "layer", dropout_p, backend="ext")[pick]

    def expected(x, residual, w, b):
        mask = spec_mask(reference.new_dropout_seed(x.device), x.shape, dropout_p) if dropout_p else None
        return reference.add_norm(x, residual, w, b, 1e-5, "layer", dropout_p, dropout_mask=mask)[pick]

    if used == "h":  # h does not depend on weight and bias: they are plain values here
        w, b = w.detach(), b.detach()
    check_against_reference(fused, expected, (x, residual, w, b), FP32, f"only {used}")
    if used == "h":  # y unused: weight and bias get no gradient at all
        w, b = w.requires_grad_(), b.requires_grad_()
        y, h = chargpt_kernels.add_norm(x, residual, (48,), w, b, 1e-5, "layer", dropout_p, backend="ext")
        assert torch.autograd.grad(h.sum(), (w, b), allow_unused=True) == (None, None)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_strided_and_expanded_inputs(norm):
    """x with a non-unit last stride (a transpose), residual expanded along rows (stride 0), weight a strided slice."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(56, 9, generator=gen) * 2 + 0.5).t().requires_grad_()  # (9, 56), strides (1, 9)
    residual_row = torch.randn(1, 56, generator=gen).requires_grad_()
    w = torch.randn(112, generator=gen)[::2].clone().requires_grad_()
    b = torch.randn(56, generator=gen).requires_grad_() if norm == "layer" else None

    def fused(x, residual_row, w, b):
        y, h = chargpt_kernels.add_norm(x, residual_row.expand(9, 56), (56,), w, b, 1e-5, norm, 0.2, backend="ext")
        return torch.cat([y, h], -1)

    def expected(x, residual_row, w, b):
        mask = spec_mask(reference.new_dropout_seed(x.device), (9, 56), 0.2)
        return torch.cat(reference.add_norm(x, residual_row.expand(9, 56), w, b, 1e-5, norm, 0.2, dropout_mask=mask),
                         -1)

    check_against_reference(fused, expected, (x, residual_row, w, b), FP32, f"strided {norm}")
    w_strided = torch.randn(112, generator=gen)[::2]
    check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (56,), w, 1e-6, backend="ext"),
                            lambda x, w: reference.rms_norm(x, w, 1e-6), (x, w_strided.requires_grad_()), FP32,
                            "strided rms_norm")


@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_do_not_depend_on_the_thread_count(dtype):
    """Rows are split among threads, but each row's arithmetic, the dropout mask and the dW/dB reduction order are
    fixed: one thread and two give bit-identical outputs and gradients (several dW/dB chunks here, and in bfloat16
    several conversion blocks)."""
    x, w, b = layer_norm_inputs((700,), 384, "cpu", dtype, True, True, seed=8)
    residual = layer_norm_inputs((700,), 384, "cpu", dtype, False, False, seed=9)[0]
    grad = torch.randn(700, 768, generator=torch.Generator().manual_seed(10)).to(dtype)

    def run():
        torch.manual_seed(0)
        out = torch.cat(chargpt_kernels.add_norm(x, residual, (384,), w, b, 1e-5, "layer", 0.2, backend="ext"), -1)
        rms = chargpt_kernels.rms_norm(x, (384,), w, backend="ext")
        ln = chargpt_kernels.layer_norm(x, (384,), w, b, backend="ext")
        return [out, rms, ln, *torch.autograd.grad(out, (x, residual, w, b), grad),
                *torch.autograd.grad(rms, (x, w), grad[:, :384]), *torch.autograd.grad(ln, (x, w, b), grad[:, :384])]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(one, two):
        assert torch.equal(a, b_)


def test_torch_compile_traces_the_ops():
    """The fakes let dynamo/AOT trace add_norm and rms_norm in one graph (aot_eager: no C++ compiler needed)."""
    x, w, b = layer_norm_inputs((12,), 32, "cpu", FP32, True, True, seed=11)
    residual = layer_norm_inputs((12,), 32, "cpu", FP32, False, False, seed=12)[0]

    def block(x, residual, w, b):
        y, h = chargpt_kernels.ext_layer_norm.add_norm(x, residual, w, b, 1e-5, "layer", 0.0)
        return chargpt_kernels.ext_layer_norm.rms_norm(y, w, 1e-6) + h

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    want = block(x, residual, w, b)
    got = compiled(x, residual, w, b)
    assert_close(got, want.double(), FP32, "compiled forward")
    grads = torch.autograd.grad(got.sum(), (x, residual, w, b))
    want_grads = torch.autograd.grad(want.sum(), (x, residual, w, b))
    for g, r in zip(grads, want_grads):
        assert_close(g, r.double(), FP32, "compiled gradient")


def test_rms_norm_eps_none_is_torchs_default():
    x = layer_norm_inputs((4,), 16, "cpu", FP32, False, False, seed=13, requires_grad=False)[0] * 1e-4
    assert_close(chargpt_kernels.rms_norm(x, (16,), backend="ext"),
                 F.rms_norm(x.double(), (16,), eps=torch.finfo(FP32).eps), FP32, "eps None")


_SMALL_AND_LARGE_NORMS = """
import ctypes, torch, chargpt_kernels
count = ctypes.CDLL(None).chargpt_test_parallel_regions
torch.set_num_threads(2)
def regions(fn):
    fn()  # warm-up (first-call set-up)
    before = count()
    fn()
    return count() - before
def rms_norm(m, n):
    x = torch.randn(m, n, requires_grad=True)
    return lambda: chargpt_kernels.rms_norm(x, (n,), torch.ones(n), backend="ext").sum().backward()
def add_norm(m, n, p):
    x, r = torch.randn(m, n, requires_grad=True), torch.randn(m, n, requires_grad=True)
    def run():  # no torch.cat: torch's own ops past its grain would open regions of their own
        y, h = chargpt_kernels.add_norm(x, r, (n,), torch.ones(n), torch.zeros(n), dropout_p=p, backend="ext")
        (y.sum() + h.sum()).backward()
    return run
small = {"rms_norm 64x384": rms_norm(64, 384), "add_norm 40x768": add_norm(40, 768, 0.0),
         "add_norm 8x384 dropout": add_norm(8, 384, 0.1)}
large = {"rms_norm 4096x384": rms_norm(4096, 384), "add_norm 512x384 dropout": add_norm(512, 384, 0.1)}
print({name: regions(fn) for name, fn in small.items()})
print({name: regions(fn) for name, fn in large.items()})
"""


def test_small_jobs_open_no_parallel_region(tmp_path):
    """Like LayerNorm's (tests/test_ext_fixes.py, whose GOMP_parallel counter this borrows): small rms_norm and
    add_norm jobs run on the calling thread, large ones open regions."""
    from test_ext_fixes import _COUNT_REGIONS

    if not sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD interposition of libgomp is Linux-only")
    lib = tmp_path / "count_regions.so"
    (tmp_path / "count_regions.c").write_text(_COUNT_REGIONS)
    build = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(tmp_path / "count_regions.c"),
                            "-ldl"], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build the GOMP_parallel counter: {build.stderr[:200]}")
    run = subprocess.run([sys.executable, "-c", _SMALL_AND_LARGE_NORMS], env=checkout_env(LD_PRELOAD=str(lib)),
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    small, large = (ast.literal_eval(line) for line in run.stdout.strip().splitlines()[-2:])
    assert all(n > 0 for n in large.values()), f"the counter saw no region in large jobs: {large}"
    assert all(n == 0 for n in small.values()), f"small jobs opened OpenMP parallel regions: {small}"
