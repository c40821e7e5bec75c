"""Regressions for the `ext` backend's correctness fixes (issue "Correctness"), on the CPU kernels; the CUDA kernels
get the same cases in tests/test_cuda_emulated.py. Each test here failed before its fix.

NaN patterns in causal attention are compared as a sandwich. The float64 reference multiplies every masked weight
by its key (0 * NaN = NaN), so its NaNs also reach entries the masked keys cannot affect; a tiled kernel that skips
the tiles past the diagonal cannot (and should not) reproduce those. So the kernel's NaNs must include every NaN of
the exact function (each query over just the keys it sees) and lie within the reference's; without a mask the two
bounds are the same pattern.
"""

import ast
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference

from chargpt_helpers import checkout_env, cpu_flags
from conftest import assert_close, require_backend

ext_attention = None


@pytest.fixture(scope="module", autouse=True)
def ext():
    require_backend("ext", "cpu")
    global ext_attention
    from chargpt_kernels import ext_attention


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def exact_attention(q, k, v, causal, scale):
    """softmax(q k^T) v with each causal query row over only the keys it sees: no masked entry exists at all."""
    if not causal:
        return reference.attention(q, k, v, False, scale=scale)
    rows = [reference.attention(q[..., i:i + 1, :], k[..., :i + 1, :], v[..., :i + 1, :], False, scale=scale)
            for i in range(q.shape[-2])]
    return torch.cat(rows, dim=-2)


def assert_nan_sandwich(got, exact, dense, dtype, what):
    g, lo, hi = got.isnan(), exact.isnan(), dense.isnan()
    assert not (lo & ~g).any(), f"{what}: {(lo & ~g).sum().item()} entries are finite where the math gives NaN"
    assert not (g & ~hi).any(), f"{what}: {(g & ~hi).sum().item()} NaNs where the float64 reference has none"
    both = ~g & ~hi
    assert_close(got[both], dense[both], dtype, what)


def _nan_in_k(q, k, v):
    k[0, 0, 35, 3] = float("nan")


def _nan_in_k0(q, k, v):  # causal row 0 sees only this key
    k[0, 0, 0, 3] = float("nan")


def _inf_in_q(q, k, v):
    q[0, 0, 10, 2] = float("inf")


def _nan_in_q(q, k, v):
    q[0, 0, 50, 1] = float("nan")


def _nan_in_v(q, k, v):
    v[0, 0, 65, 3] = float("nan")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("poison", [_nan_in_k, _nan_in_k0, _inf_in_q, _nan_in_q, _nan_in_v],
                         ids=["nan-k", "nan-k0", "inf-q", "nan-q", "nan-v"])
def test_attention_propagates_nan_and_inf(poison, causal):
    """NaN in, NaN out: a NaN key or an infinite query used to give finite rows, and never reached dV (a vector max
    that dropped NaN, and an exp that clamped its argument)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 70, 16, generator=gen).unbind(0)
    poison(q, k, v)
    grad_out = torch.randn(1, 1, 70, 16, generator=gen)
    scale = 16 ** -0.5
    got = _grads(lambda a, b, c: ext_attention.attention(a, b, c, causal, 0.0, scale), (q, k, v), grad_out)
    as64 = [t.double() for t in (q, k, v)]
    dense = _grads(lambda a, b, c: reference.attention(a, b, c, causal, scale=scale), as64, grad_out)
    exact = _grads(lambda a, b, c: exact_attention(a, b, c, causal, scale), as64, grad_out)
    assert got[0].isnan().any(), "the poisoned input reached no output"
    for name, a, lo, hi in zip(("out", "dq", "dk", "dv"), got, exact, dense):
        assert_nan_sandwich(a, lo, hi, torch.float32, f"ext attention {name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_fully_masked_row_gives_zero(causal):
    """A query row whose scores are all -inf (here q = -inf against positive keys; later an attn_mask row of
    False) gives output 0 and dq 0, as torch's SDPA does, instead of NaN. The row is the last one, so causal
    masking hides none of its keys and every implementation multiplies the same entries."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 1, 2, 40, 16, generator=gen).unbind(0)
    k[..., 0] = k[..., 0].abs() + 0.1
    q[0, 1, -1, 0] = float("-inf")
    grad_out = torch.randn(1, 2, 40, 16, generator=gen)
    got = _grads(lambda a, b, c: ext_attention.attention(a, b, c, causal, 0.0, 0.25), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=0.25),
                  [t.double() for t in (q, k, v)], grad_out)
    assert torch.equal(got[0][0, 1, -1], torch.zeros(16)) and torch.equal(got[1][0, 1, -1], torch.zeros(16))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a.isnan(), w.isnan()), f"{name}: NaN pattern differs from torch's SDPA"
        assert_close(a.nan_to_num(), w.nan_to_num(), torch.float32, f"ext attention, fully masked row, {name}")


@pytest.mark.parametrize("n", [384, 768, 1000, 4099])
def test_layer_norm_of_constant_rows_is_exact(n):
    """A constant row normalises to exactly 0 (and to the bias with an affine), whatever eps: BERT's eps = 1e-12
    used to turn the mean's rounding error into -0.0149. 384 takes the four-rows-at-a-time path."""
    values = torch.tensor([0.1, -3.7, 1e4, 1 / 3, 2.5e-3, -0.1, 7.0, 0.3])
    x = values[:, None].expand(-1, n).contiguous()
    w, b = torch.randn(2, n, generator=torch.Generator().manual_seed(n)).unbind(0)
    y = chargpt_kernels.layer_norm(x, (n,), eps=1e-12, backend="ext")
    assert torch.equal(y, torch.zeros_like(x)), f"max |y| = {y.abs().max().item():.3g}, want exactly 0"
    y = chargpt_kernels.layer_norm(x, (n,), w, b, eps=1e-12, backend="ext")
    assert torch.equal(y, b.expand_as(x)), f"max |y - bias| = {(y - b).abs().max().item():.3g}, want exactly 0"
    assert chargpt_kernels.layer_norm(torch.full((1, 768), 0.1), (768,), eps=1e-12, backend="ext").abs().max() == 0


@pytest.mark.parametrize("n", [384, 4099])
def test_layer_norm_accuracy_near_constant_rows(n):
    """Rows with a large offset and a small spread, where the mean's rounding shows most, against float64: ext was
    off by ~1e-2 here (as is torch's CPU LayerNorm); the bound is what an fp32 mean allows (half an ulp of 100 is
    ~4e-3 of the spread)."""
    gen = torch.Generator().manual_seed(n)
    x = 100.0 + 1e-3 * torch.randn(16, n, generator=gen)
    y = chargpt_kernels.layer_norm(x, (n,), eps=1e-12, backend="ext")
    want = reference.layer_norm(x.double(), None, None, 1e-12)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=5e-3)


def _layer_norm_loss(x, w, b):
    return chargpt_kernels.layer_norm(x, (x.shape[-1],), w, b, backend="ext").square().sum()


def _attention_loss(q, k, v):
    return ext_attention.attention(q, k, v, True, 0.0, 0.25).square().sum()


@pytest.mark.parametrize("op,loss,shapes", [("layer_norm", _layer_norm_loss, [(6, 24), (24,), (24,)]),
                                            ("attention", _attention_loss, [(1, 2, 9, 16)] * 3)],
                         ids=["layer_norm", "attention"])
def test_double_backward_raises(op, loss, shapes):
    """A second derivative through an ext op raises, naming the op: it used to come out as None or zeros. First
    derivatives taken with create_graph=True are still right (only differentiating them again fails)."""
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]
    plain = torch.autograd.grad(loss(*inputs), inputs)
    grads = torch.autograd.grad(loss(*inputs), inputs, create_graph=True)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"chargpt::{op}: double backward is not supported"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)


def test_double_backward_raises_without_weight_or_with_dropout():
    """The same through the optional inputs: LayerNorm without weight, attention with a dropout seed."""
    x = torch.randn(4, 8, requires_grad=True)
    (g,) = torch.autograd.grad(chargpt_kernels.layer_norm(x, (8,), backend="ext").square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="chargpt::layer_norm: double backward is not supported"):
        torch.autograd.grad(g.sum(), x)
    q, k, v = torch.randn(3, 1, 1, 5, 8).requires_grad_().unbind(0)
    out = chargpt_kernels.causal_attention(q, k, v, dropout_p=0.3, backend="ext")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="chargpt::attention: double backward is not supported"):
        torch.autograd.grad(g.sum(), q)


_COUNT_REGIONS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long regions;
long chargpt_test_parallel_regions(void) { return __atomic_load_n(&regions, __ATOMIC_RELAXED); }
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  static void (*real)(void (*)(void*), void*, unsigned, unsigned);
  if (!real) real = (void (*)(void (*)(void*), void*, unsigned, unsigned))dlsym(RTLD_NEXT, "GOMP_parallel");
  __atomic_fetch_add(&regions, 1, __ATOMIC_RELAXED);
  real(fn, data, num_threads, flags);
}
"""

_SMALL_AND_LARGE_JOBS = """
import ctypes, sys, torch, chargpt_kernels
from chargpt_kernels import ext_attention
count = ctypes.CDLL(None).chargpt_test_parallel_regions
torch.set_num_threads(2)
def regions(fn):
    fn()  # warm-up (first-call set-up)
    before = count()
    fn()
    return count() - before
def layer_norm(m, n):
    x = torch.randn(m, n, requires_grad=True)
    return lambda: chargpt_kernels.layer_norm(x, (n,), torch.ones(n), torch.zeros(n), backend="ext").sum().backward()
def attention(b, h, t, d):
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    return lambda: ext_attention.attention(q, k, v, True, 0.0, 0.125).sum().backward()
small = {"layer_norm 8x16": layer_norm(8, 16), "layer_norm 64x384": layer_norm(64, 384),
         "layer_norm 40x768": layer_norm(40, 768), "attention 1x2x16x16": attention(1, 2, 16, 16),
         "attention 2x4x8x32": attention(2, 4, 8, 32)}
large = {"layer_norm 4096x384": layer_norm(4096, 384), "attention 2x4x128x64": attention(2, 4, 128, 64)}
print({name: regions(fn) for name, fn in small.items()})
print({name: regions(fn) for name, fn in large.items()})
"""


def test_small_jobs_open_no_parallel_region(tmp_path):
    """Ext ops below ~32K elements of work (ATen's GRAIN_SIZE) run on the calling thread: waking a second thread
    costs more than it saves, and under load it spin-waits. Counted in a subprocess by interposing libgomp's
    GOMP_parallel (every `omp parallel` region goes through it); the large jobs show that the count works."""
    if not sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD interposition of libgomp is Linux-only")
    lib = tmp_path / "count_regions.so"
    (tmp_path / "count_regions.c").write_text(_COUNT_REGIONS)
    build = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(tmp_path / "count_regions.c"),
                            "-ldl"], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build the GOMP_parallel counter: {build.stderr[:200]}")
    env = checkout_env(LD_PRELOAD=str(lib))
    run = subprocess.run([sys.executable, "-c", _SMALL_AND_LARGE_JOBS], env=env, capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    small, large = (ast.literal_eval(line) for line in run.stdout.strip().splitlines()[-2:])
    assert all(n > 0 for n in large.values()), f"the counter saw no region in large jobs: {large}"
    assert all(n == 0 for n in small.values()), f"small jobs opened OpenMP parallel regions: {small}"


_PORTABLE_BUILD_CHECK = """
import torch, chargpt_kernels
from chargpt_kernels import ext_build, reference
from chargpt_kernels.backends import unavailable_reason
assert unavailable_reason("ext") is None, unavailable_reason("ext")
gen = torch.Generator().manual_seed(0)
x = torch.randn(37, 300, generator=gen, requires_grad=True)
w, b = torch.randn(2, 300, generator=gen).requires_grad_().unbind(0)
y = chargpt_kernels.layer_norm(x, (300,), w, b, backend="ext")
q, k, v = (torch.randn(2, 3, 70, 40, generator=gen, requires_grad=True) for _ in range(3))
out = chargpt_kernels.causal_attention(q, k, v, dropout_p=0.0, backend="ext")
got = [y, *torch.autograd.grad(y.sum(), (x, w, b)), out, *torch.autograd.grad(out.sum(), (q, k, v))]
x64, w64, b64, q64, k64, v64 = (t.detach().double().requires_grad_() for t in (x, w, b, q, k, v))
y64 = reference.layer_norm(x64, w64, b64, 1e-5)
out64 = reference.attention(q64, k64, v64, True)
want = [y64, *torch.autograd.grad(y64.sum(), (x64, w64, b64)), out64,
        *torch.autograd.grad(out64.sum(), (q64, k64, v64))]
for a, e in zip(got, want):
    torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))
import glob, os
print(*glob.glob(os.environ["CHARGPT_EXT_DIR"] + "/*/chargpt_ext_cpu*.so"), sep="\\n")
"""


@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3"])
def test_portable_builds_give_the_same_answers(march):
    """CHARGPT_EXT_MARCH builds the C++ kernels for a chosen target (an AVX2 laptop: x86-64-v3; SSE4.2 only:
    x86-64-v2) into a cache directory of its own, keyed by the target and the CPU; each build's LayerNorm and
    attention, forward and backward, match float64, and the binary has no AVX-512 (simd.h's fallback paths compile).
    One C++ build per target (~20-60 s, cached under <ext cache>/march-check for later runs)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 targets")
    if march == "x86-64-v3" and not {"avx2", "fma", "bmi2"} <= cpu_flags():
        pytest.skip("this CPU cannot run x86-64-v3 code")
    base = os.environ.get("CHARGPT_EXT_DIR") or os.path.join(Path.home(), ".cache", "chargpt", "ext")
    env = checkout_env(CHARGPT_EXT_MARCH=march, CHARGPT_EXT_DIR=os.path.join(base, "march-check"))
    run = subprocess.run([sys.executable, "-c", _PORTABLE_BUILD_CHECK], env=env, capture_output=True, text=True,
                         timeout=900, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    libs = [line for line in run.stdout.splitlines() if line.endswith(".so") and f"-cpu-{march}-" in line]
    assert libs, f"no build in a {march} cache directory: {run.stdout}"
    objdump = shutil.which("objdump")
    if objdump:
        asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", libs[0]], capture_output=True, text=True).stdout
        assert not re.search(r"%zmm\d", asm), f"the {march} build uses AVX-512 registers"
        if march == "x86-64-v2":
            assert not re.search(r"%ymm\d", asm), "the x86-64-v2 build uses AVX registers"


def test_bad_march_value_says_so(tmp_path):
    env = checkout_env(CHARGPT_EXT_MARCH="native -O0", CHARGPT_EXT_DIR=str(tmp_path))
    code = "from chargpt_kernels.backends import unavailable_reason; print(unavailable_reason('ext'))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "CHARGPT_EXT_MARCH='native -O0' is not a -march value" in run.stdout, run.stdout + run.stderr[-1000:]
