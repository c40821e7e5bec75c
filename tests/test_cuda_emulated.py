"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator in tests/cuda_emulator, against the float64
reference: forward and backward, fp32/fp16/bf16, the SIMT and the tensor-core (WMMA) attention, dropout.

On a machine without a GPU this is the only place the CUDA code executes. The emulator runs a block's threads as
fibers that switch at barriers and shuffles (see tests/cuda_emulator/include/cuda_emulation.h), which is slow, so
the shapes are small; they still cover several tiles, ragged edges, Tq != Tk and every head-dim bucket. What it
cannot show (speed, memory coalescing, races between barriers in general) is left to the GPU check."""

import os
import sys
from pathlib import Path

import pytest
import torch

from chargpt_kernels import reference

from conftest import assert_close

EMULATOR = Path(__file__).resolve().parent / "cuda_emulator"
HALF_TYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def ops():
    from torch.utils import cpp_extension

    if not sys.platform.startswith("linux"):
        pytest.skip("the CUDA emulator's fibers use glibc's ucontext")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the CUDA emulator")
    base = os.environ.get("CHARGPT_EXT_DIR") or os.path.join(Path.home(), ".cache", "chargpt", "ext")
    build_dir = os.path.join(base, f"torch-{torch.__version__}-cuda-emulator")
    os.makedirs(build_dir, exist_ok=True)
    print("compiling the CUDA emulator build of csrc/cuda (cached in", build_dir, ")", file=sys.stderr, flush=True)
    cpp_extension.load(name="chargpt_cuda_emulator", sources=[str(EMULATOR / "emulated_ops.cpp")],
                       extra_include_paths=[str(EMULATOR / "include")], extra_cflags=["-O2"],
                       build_directory=build_dir, is_python_module=False, verbose=False)
    return torch.ops.chargpt_emulated


def fresh(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (rows, N): one row, ragged warps, 16-byte packs or not (N % 8), N > 32 * pack (several sweeps per lane).
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=str)
@pytest.mark.parametrize("rows,n", [(1, 40), (7, 59), (13, 80), (70, 256), (5, 1000)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-rows"])
def test_layer_norm(ops, dtype, rows, n, strided):
    ops.configure(9, strided)  # both thread orders over the cases
    seed = rows * 1000 + n
    x = fresh(rows, n + 8 if strided else n, dtype=dtype, seed=seed)[:, :n]  # row stride != n
    w, b = fresh(n, dtype=dtype, seed=seed + 1), fresh(n, dtype=dtype, seed=seed + 2)
    g = fresh(rows, n, dtype=dtype, seed=seed + 3)
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
    dx, dw, db = ops.layer_norm_bwd(g, x, w, mean, rstd)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    want = reference.layer_norm(x64, w64, b64, 1e-5)
    want_grads = torch.autograd.grad(want, (x64, w64, b64), g.double())
    assert_close(y, want, dtype, "emulated CUDA layer_norm y")
    assert_close(mean, x64.detach().mean(-1), torch.float32, "emulated CUDA layer_norm mean")  # fp32 statistics
    for name, got, ref in zip(("dx", "dw", "db"), (dx, dw, db), want_grads):
        assert_close(got, ref, dtype, f"emulated CUDA layer_norm {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [768, 1000, 4099])
def test_layer_norm_of_constant_rows_is_exact(ops, dtype, n):
    """A constant row normalises to exactly 0 (to the bias with an affine) even with BERT's eps = 1e-12: the
    per-lane Welford means are exact for constant data, and so are Chan's merges (tests/test_ext_fixes.py has the
    CPU side, which was not)."""
    ops.configure(9, n % 2 == 0)
    values = torch.tensor([0.1, -3.7, 1e4, 1 / 3])
    x = values[:, None].expand(-1, n).contiguous().to(dtype)
    b = fresh(n, dtype=dtype, seed=n)
    y, _, _ = ops.layer_norm_fwd(x, None, None, 1e-12)
    assert torch.equal(y, torch.zeros_like(x)), f"max |y| = {y.abs().max().item():.3g}, want exactly 0"
    y, _, _ = ops.layer_norm_fwd(x, fresh(n, dtype=dtype, seed=n + 1), b, 1e-12)
    assert torch.equal(y, b.expand_as(x)), f"max |y - bias| = {(y - b).abs().max().item():.3g}, want exactly 0"


# rms_norm and add_norm share the LayerNorm kernels (statistics with the mean fixed at 0 for RMSNorm; add_norm
# normalises the h it writes). Shapes as above plus a 65,536-wide row.
NORM_SHAPES = [(1, 40), (7, 59), (13, 80), (5, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=str)
@pytest.mark.parametrize("rows,n", NORM_SHAPES + [(2, 65536)])
@pytest.mark.parametrize("weight", [True, False], ids=["w", "none"])
def test_rms_norm(ops, dtype, rows, n, weight):
    if n == 65536 and (dtype != torch.float32 or not weight):
        pytest.skip("one wide case is enough (slow to emulate)")
    ops.configure(9, rows % 2 == 1)
    seed = rows * 1000 + n
    x = fresh(rows, n + 8, dtype=dtype, seed=seed)[:, :n]  # row stride != n
    w = fresh(n, dtype=dtype, seed=seed + 1) if weight else None
    g = fresh(rows, n, dtype=dtype, seed=seed + 3)
    y, rstd = ops.rms_norm_fwd(x, w, 1e-6)
    dx, dw = ops.rms_norm_bwd(g, x, w, rstd)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_() if weight else None
    want = reference.rms_norm(x64, w64, 1e-6)
    want_grads = torch.autograd.grad(want, [t for t in (x64, w64) if t is not None], g.double())
    assert_close(y, want, dtype, "emulated CUDA rms_norm y")
    for name, got, ref in zip(("dx", "dw"), (dx, dw), want_grads):
        assert_close(got, ref, dtype, f"emulated CUDA rms_norm {name}")


def run_add_norm(ops, x, residual, w, b, norm, p, eps=1e-5, grad_h=True, seed=987654321):
    """The emulated add_norm forward and backward, and the float64 reference's under the spec mask."""
    rows, n = x.shape
    seed = torch.tensor([seed], dtype=torch.int64) if p > 0 else None
    y, h, mean, rstd = ops.add_norm_fwd(x, residual, w, b, eps, norm, p, seed)
    gy = fresh(rows, n, dtype=x.dtype, seed=77)
    gh = fresh(rows, n, dtype=x.dtype, seed=78) if grad_h else None
    dh, dx, dw, db = ops.add_norm_bwd(gy, gh, h, w, mean, rstd, norm, p, seed)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, residual, w, b)]
    mask = reference.dropout_keep_mask(int(seed), 1, 1, rows, n, p).view(rows, n) if p > 0 else None
    y64, h64 = reference.add_norm(*leaves, eps, norm, p, dropout_mask=mask)
    wanted = [t for t in leaves if t is not None]
    outs = [y64] + ([h64] if grad_h else [])
    grads = [gy.double()] + ([gh.double()] if grad_h else [])
    want = torch.autograd.grad(outs, wanted, grads, allow_unused=True)
    got = {"y": y, "h": h, "dx": dx if p > 0 else dh, "dresidual": dh, "dw": dw, "db": db}
    ref = {"y": y64, "h": h64, "dx": want[0], "dresidual": want[1]}
    if w is not None:
        ref["dw"] = want[2]
    if b is not None:
        ref["db"] = want[3]
    return got, ref


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=str)
@pytest.mark.parametrize("rows,n", NORM_SHAPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_add_norm(ops, dtype, rows, n, norm, dropout_p):
    ops.configure(9, (rows + n) % 2 == 0)
    seed = rows * 1000 + n
    x = fresh(rows, 2 * n, dtype=dtype, seed=seed)[:, ::2] if n % 2 else fresh(rows, n, dtype=dtype, seed=seed)
    residual = fresh(rows, n + 8, dtype=dtype, seed=seed + 1)[:, :n]
    w = fresh(n, dtype=dtype, seed=seed + 2)
    b = fresh(n, dtype=dtype, seed=seed + 3) if norm == "layer" else None
    got, ref = run_add_norm(ops, x, residual, w, b, norm, dropout_p, grad_h=rows != 7)
    for name, want in ref.items():
        assert_close(got[name], want, dtype, f"emulated CUDA add_norm {norm} p={dropout_p} {name}")


def test_add_norm_wide_rows_and_dropout(ops):
    ops.configure(9, False)
    x, residual = fresh(2, 65536, dtype=torch.float32, seed=1), fresh(2, 65536, dtype=torch.float32, seed=2)
    w, b = fresh(65536, dtype=torch.float32, seed=3), fresh(65536, dtype=torch.float32, seed=4)
    got, ref = run_add_norm(ops, x, residual, w, b, "layer", 0.1)
    for name, want in ref.items():
        assert_close(got[name], want, torch.float32, f"emulated CUDA add_norm N=65536 {name}")


def test_add_norm_constant_rows_and_nan(ops):
    """h constant along a row normalises to exactly the bias at eps=1e-12; a NaN in x that dropout drops still
    makes its row NaN (x * 0), and only that row."""
    ops.configure(9, True)
    n = 1000
    residual = torch.tensor([0.1, -3.7, 1e4, 1 / 3])[:, None].expand(-1, n).contiguous()
    b = fresh(n, dtype=torch.float32, seed=5)
    y, h, _, _ = ops.add_norm_fwd(torch.zeros(4, n), residual, fresh(n, dtype=torch.float32, seed=6), b, 1e-12,
                                  "layer", 0.0, None)
    assert torch.equal(h, residual) and torch.equal(y, b.expand(4, n))
    seed = torch.tensor([5], dtype=torch.int64)
    mask = reference.dropout_keep_mask(5, 1, 1, 4, n, 0.5).view(4, n)
    x = fresh(4, n, dtype=torch.float32, seed=7)
    x[2, int((~mask[2]).nonzero()[0])] = float("nan")
    y, h, _, _ = ops.add_norm_fwd(x, residual, None, None, 1e-5, "layer", 0.5, seed)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all() and torch.isfinite(h[[0, 1, 3]]).all()


# (B, H, Tq, Tk, D): a single token, D in every SIMT bucket (64/128/256) and tensor-core bucket (64/128),
# ragged tiles, Tq != Tk, and T = 70 (more than one 64-row block and 16/32-key step of the tensor-core kernels).
ATTENTION_SHAPES = [(1, 1, 1, 1, 16), (1, 2, 7, 7, 40), (1, 1, 19, 19, 80), (1, 1, 5, 19, 32), (1, 1, 9, 9, 256),
                    (1, 1, 70, 70, 64)]


def run_attention(ops, q, k, v, causal, dropout_p=0.0, seed=None, mask=None):
    scale = q.shape[-1] ** -0.5
    out, lse = ops.attention_fwd(q, k, v, causal, dropout_p, scale, seed, None)
    grad = torch.randn(out.shape).to(q.dtype)
    dq, dk, dv = ops.attention_bwd(grad, q, k, v, out, lse, causal, dropout_p, scale, seed, None)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference.attention(q64, k64, v64, causal, dropout_p, scale, dropout_mask=mask)
    return (out, dq, dk, dv), (want, *torch.autograd.grad(want, (q64, k64, v64), grad.double()))


def attention_cases():
    for shape in ATTENTION_SHAPES:
        for dtype in (torch.float32, *HALF_TYPES):
            kinds = ["simt"] if dtype == torch.float32 else ["simt", "tensor-core"]
            for kind in kinds:
                if shape[2] == 70 and kind == "simt":
                    continue  # the SIMT kernels are shuffle-bound: slow to emulate, and covered by the other shapes
                yield pytest.param(shape, dtype, kind, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{kind}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape,dtype,kind", attention_cases())
def test_attention(ops, shape, dtype, kind, causal):
    ops.configure(8 if kind == "tensor-core" else 7, causal)  # the GPU the host code sees; both thread orders
    b, h, tq, tk, d = shape
    torch.manual_seed(tq * 100 + d)
    q = fresh(b, tq, h, d, dtype=dtype, seed=1).transpose(1, 2)  # (B, T, H, D) storage, as nanoGPT makes it
    k, v = (fresh(b, tk, h, d, dtype=dtype, seed=s).transpose(1, 2) for s in (2, 3))
    got, want = run_attention(ops, q, k, v, causal)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, ref, dtype, f"emulated CUDA {kind} attention {name}")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_tensor_core_attention_on_unaligned_views(ops, dtype):
    """Rows that do not start on 16 bytes (a view one element into its storage, row stride 17) are copied to
    aligned rows by the host code before the tensor-core kernels' 16-byte loads."""
    ops.configure(8, False)
    q, k, v = (fresh(1, 2, 21, 17, dtype=dtype, seed=s)[..., 1:] for s in (7, 8, 9))
    got, want = run_attention(ops, q, k, v, True)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, ref, dtype, f"emulated CUDA tensor-core attention, unaligned {name}")


@pytest.mark.parametrize("dtype,kind", [(torch.float32, "simt"), (torch.bfloat16, "simt"),
                                        (torch.float16, "tensor-core"), (torch.bfloat16, "tensor-core")],
                         ids=["fp32-simt", "bf16-simt", "fp16-tensor-core", "bf16-tensor-core"])
def test_attention_dropout_uses_the_specified_mask(ops, dtype, kind):
    ops.configure(8 if kind == "tensor-core" else 7, kind == "simt")
    b, h, t, d, p = 1, 2, 21, 32, 0.3
    q, k, v = (fresh(b, h, t, d, dtype=dtype, seed=s) for s in (4, 5, 6))
    seed = torch.tensor(987654321, dtype=torch.int64)
    mask = reference.dropout_keep_mask(int(seed), b, h, t, t, p, device="cpu")
    got, want = run_attention(ops, q, k, v, True, p, seed, mask)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, ref, dtype, f"emulated CUDA {kind} attention dropout {name}")


def test_emulator_includes_every_cuda_source():
    """emulated_ops.cpp compiles the .cu files by #include: a new file in csrc/cuda must be added there too."""
    from chargpt_kernels import ext_build

    text = (EMULATOR / "emulated_ops.cpp").read_text()
    missing = [Path(p).name for p in ext_build.cuda_sources() if f'"../../csrc/cuda/{Path(p).name}"' not in text]
    assert not missing, f"tests/cuda_emulator/emulated_ops.cpp does not include {missing}"


# Special values (issue "Correctness"): the kinds and dtypes that run different softmax code, at a shape past a
# tensor-core key tile (32) and backward step (16).
SPECIAL_KINDS = [pytest.param(torch.float32, "simt", id="fp32-simt"),
                 pytest.param(torch.float16, "tensor-core", id="fp16-tensor-core"),
                 pytest.param(torch.bfloat16, "tensor-core", id="bf16-tensor-core")]


def _special_inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = torch.randn(4, 1, 2, 40, 32, generator=gen).unbind(0)
    return q, k, v, g


def _emulated_with_grads(ops, q, k, v, g, causal, scale):
    out, lse = ops.attention_fwd(q, k, v, causal, 0.0, scale, None, None)
    return [out, *ops.attention_bwd(g, q, k, v, out, lse, causal, 0.0, scale, None, None)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("poison", ["nan-k", "nan-k0", "inf-q"])
@pytest.mark.parametrize("dtype,kind", SPECIAL_KINDS)
def test_attention_propagates_nan_and_inf(ops, dtype, kind, poison, causal):
    """NaN in, NaN out, with the NaN pattern between the exact function's and the float64 reference's (see
    tests/test_ext_fixes.py): a NaN key or an infinite query must not leave finite rows behind."""
    from test_ext_fixes import assert_nan_sandwich, exact_attention

    ops.configure(8 if kind == "tensor-core" else 7, causal)
    q, k, v, g = _special_inputs(dtype, 11)
    if poison == "nan-k":
        k[0, 1, 20, 3] = float("nan")
    elif poison == "nan-k0":  # causal row 0 sees only this key: its max over the tile must not drop the NaN
        k[0, 1, 0, 3] = float("nan")
    else:
        q[0, 0, 10, 2] = float("inf")
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    scale = 32 ** -0.5
    got = _emulated_with_grads(ops, q, k, v, g, causal, scale)
    as64 = [t.double().requires_grad_() for t in (q, k, v)]
    dense = reference.attention(*as64, causal, scale=scale)
    dense = [dense.detach(), *torch.autograd.grad(dense, as64, g.double())]
    as64 = [t.detach().clone().requires_grad_() for t in as64]
    exact = exact_attention(*as64, causal, scale)
    exact = [exact.detach(), *torch.autograd.grad(exact, as64, g.double())]
    assert got[0].isnan().any(), "the poisoned input reached no output"
    for name, a, lo, hi in zip(("out", "dq", "dk", "dv"), got, exact, dense):
        assert_nan_sandwich(a, lo, hi, dtype, f"emulated CUDA {kind} attention {name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype,kind", SPECIAL_KINDS)
def test_attention_fully_masked_row_gives_zero(ops, dtype, kind, causal):
    """A query row whose scores are all -inf gives output 0 and dq 0, as torch's SDPA does (not NaN); the row is
    the last one, so causal masking hides none of its keys (see tests/test_ext_fixes.py)."""
    import torch.nn.functional as F

    ops.configure(8 if kind == "tensor-core" else 7, not causal)
    q, k, v, g = _special_inputs(dtype, 12)
    k[..., 0] = k[..., 0].abs() + 0.1
    q[0, 1, -1, 0] = float("-inf")
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    got = _emulated_with_grads(ops, q, k, v, g, causal, 0.25)
    as64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*as64, is_causal=causal, scale=0.25)
    want = [want.detach(), *torch.autograd.grad(want, as64, g.double())]
    zeros = torch.zeros(32, dtype=dtype)
    assert torch.equal(got[0][0, 1, -1], zeros) and torch.equal(got[1][0, 1, -1], zeros)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a.isnan(), w.isnan()), f"{name}: NaN pattern differs from torch's SDPA"
        assert_close(a.double().nan_to_num(), w.nan_to_num(), dtype, f"emulated CUDA {kind}, fully masked {name}")


# attn_mask and GQA (issue 11): the mask forms models hand over, read through their strides (broadcast dims stride
# 0), and query groups whose dK/dV the blocks owning a kv head sum in order; both kernel families.
@pytest.mark.parametrize("group", [1, 3], ids=["mha", "gqa3"])
@pytest.mark.parametrize("mask_kind", ["padding", "bool-4d", "additive", "additive-strided"])
@pytest.mark.parametrize("dtype,kind", SPECIAL_KINDS)
def test_attention_masks_and_gqa(ops, dtype, kind, mask_kind, group):
    from test_attention_masks import make_mask

    ops.configure(8 if kind == "tensor-core" else 7, group == 1)
    b, hk, tq, tk, d = 2, 1, 21, 40, 32
    hq = hk * group
    q = fresh(b, tq, hq, d, dtype=dtype, seed=31).transpose(1, 2)
    k, v = (fresh(b, tk, hk, d, dtype=dtype, seed=s).transpose(1, 2) for s in (32, 33))
    mask = make_mask(mask_kind, b, hq, tq, tk, "cpu", dtype, seed=34)
    got, want = _masked_run(ops, q, k, v, mask.expand(b, hq, tq, tk), False)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, ref, dtype, f"emulated CUDA {kind} attention, {mask_kind} mask, group {group}: {name}")


@pytest.mark.parametrize("dtype,kind", SPECIAL_KINDS)
def test_attention_mask_causal_dropout_and_gqa_together(ops, dtype, kind):
    """A padding mask with the causal mask, dropout (the reference's keep-mask) and a query group of 2."""
    from test_attention_masks import make_mask

    ops.configure(8 if kind == "tensor-core" else 7, True)
    b, hq, hk, t, d, p = 2, 4, 2, 37, 32, 0.3
    q, k, v = (fresh(b, hh, t, d, dtype=dtype, seed=s) for hh, s in ((hq, 41), (hk, 42), (hk, 43)))
    mask = make_mask("padding", b, hq, t, t, "cpu", dtype, seed=44).expand(b, hq, t, t)
    seed = torch.tensor(424242, dtype=torch.int64)
    keep = reference.dropout_keep_mask(int(seed), b, hq, t, t, p, device="cpu")
    got, want = _masked_run(ops, q, k, v, mask, True, p, seed, keep)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, ref, dtype, f"emulated CUDA {kind} attention, mask + causal + dropout + GQA: {name}")


# Decoding (group x Tq <= 8 rows, Tk >= 256): the SIMT forward's split-KV blocks and their combine, for every dtype
# (fp16/bf16 decode on SIMT too), with GQA groups, a fully masked row (padding), dropout and causal Tq < Tk.
DECODE_CASES = [pytest.param(torch.float32, (1, 4, 1, 1, 600, 32), None, 0.0, False, id="fp32-mqa4"),
                pytest.param(torch.bfloat16, (2, 2, 2, 3, 520, 64), "padding", 0.25, False, id="bf16-padding-dropout"),
                pytest.param(torch.float16, (1, 8, 1, 1, 300, 128), "additive", 0.0, False, id="fp16-mqa8-additive"),
                pytest.param(torch.float32, (1, 2, 1, 2, 400, 40), None, 0.0, True, id="fp32-causal-tq2")]


@pytest.mark.parametrize("dtype,shape,mask_kind,dropout_p,causal", DECODE_CASES)
def test_attention_decode_splits(ops, dtype, shape, mask_kind, dropout_p, causal):
    from test_attention_masks import make_mask

    ops.configure(8, False)
    b, hq, hk, tq, tk, d = shape
    q = fresh(b, tq, hq, d, dtype=dtype, seed=51).transpose(1, 2)
    k, v = (fresh(b, tk, hk, d, dtype=dtype, seed=s).transpose(1, 2) for s in (52, 53))
    mask = None if mask_kind is None else make_mask(mask_kind, b, hq, tq, tk, "cpu", dtype, seed=54)
    seed, keep = None, None
    if dropout_p:
        seed = torch.tensor(31337, dtype=torch.int64)
        keep = reference.dropout_keep_mask(int(seed), b, hq, tq, tk, dropout_p, device="cpu")
    got, want = _masked_run(ops, q, k, v, None if mask is None else mask.expand(b, hq, tq, tk), causal, dropout_p,
                            seed, keep)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, ref, dtype, f"emulated CUDA decode {shape} {mask_kind}: {name}")


def _masked_run(ops, q, k, v, mask, causal, dropout_p=0.0, seed=None, keep=None):
    """The emulated ops' (out, dq, dk, dv) under attn_mask `mask` (None or a (B, Hq, Tq, Tk) view) and the float64
    reference's."""
    scale = q.shape[-1] ** -0.5
    out, lse = ops.attention_fwd(q, k, v, causal, dropout_p, scale, seed, mask)
    grad = fresh(*out.shape, dtype=q.dtype, seed=45)
    dq, dk, dv = ops.attention_bwd(grad, q, k, v, out, lse, causal, dropout_p, scale, seed, mask)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    want = reference.attention(q64, k64, v64, causal, dropout_p, scale, ref_mask, dropout_mask=keep)
    return (out, dq, dk, dv), (want, *torch.autograd.grad(want, (q64, k64, v64), grad.double()))
