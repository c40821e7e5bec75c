"""The `ext` backend's own contract: the raw chargpt ops pass torch.library.opcheck, run under
torch.compile(fullgraph=True), give the same bits for 1 and 2 threads, and reject bad input with a message."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import chargpt_kernels
from chargpt_kernels import reference

from chargpt_helpers import checkout_env
from conftest import require_backend

ext_attention = ext_layer_norm = None  # imported by the fixture, once the extension is known to load


@pytest.fixture(scope="module", autouse=True)
def ext():
    require_backend("ext", "cpu")
    global ext_attention, ext_layer_norm
    from chargpt_kernels import ext_attention, ext_layer_norm  # registers the fakes and autograd formulas


def _qkv(b, h, tq, tk, d, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=gen).transpose(1, 2)  # non-contiguous, as in nanoGPT
    k, v = torch.randn(2, b, h, tk, d, generator=gen)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.mark.parametrize("weight,bias", [(True, True), (False, False), (True, False)], ids=["wb", "none", "w"])
def test_opcheck_layer_norm(weight, bias):
    x = torch.randn(9, 37, requires_grad=True)
    w = torch.randn(37, requires_grad=True) if weight else None
    b = torch.randn(37, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.chargpt.layer_norm_fwd, (x, w, b, 1e-5))
    with torch.no_grad():
        _, mean, rstd = torch.ops.chargpt.layer_norm_fwd(x, w, b, 1e-5)
    args = (torch.randn(9, 37), x.detach(), None if w is None else w.detach(), mean, rstd)
    torch.library.opcheck(torch.ops.chargpt.layer_norm_bwd, args)


@pytest.mark.parametrize("is_causal,dropout_p,tk", [(True, 0.0, 21), (False, 0.0, 13), (True, 0.25, 21)])
def test_opcheck_attention(is_causal, dropout_p, tk):
    q, k, v = _qkv(2, 3, 21, tk, 24)
    seed = reference.new_dropout_seed("cpu") if dropout_p else None
    torch.library.opcheck(torch.ops.chargpt.attention_fwd, (q, k, v, is_causal, dropout_p, 0.3, seed))
    with torch.no_grad():
        out, lse = torch.ops.chargpt.attention_fwd(q, k, v, is_causal, dropout_p, 0.3, seed)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, is_causal, dropout_p, 0.3, seed)
    torch.library.opcheck(torch.ops.chargpt.attention_bwd, args)


class TinyBlock(nn.Module):
    """A pre-LN attention block on the ext backend's interface functions (called directly: the dispatch in
    chargpt_kernels.backends imports modules and sets a ContextVar, which dynamo does not trace)."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, t, c = x.shape
        h = ext_layer_norm.layer_norm(x.reshape(b * t, c), self.ln.weight, self.ln.bias, 1e-5).view(b, t, c)
        q, k, v = self.qkv(h).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = ext_attention.attention(q, k, v, True, 0.0, (c // self.heads) ** -0.5)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, c))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(3, 17, 32, requires_grad=True)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
    # aot_eager traces the ops through their fakes and autograd formulas without a slow C++ codegen step.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _run_everything():
    """Outputs and gradients of both ops on shapes that split into several tasks and row chunks."""
    results = []
    x = torch.randn(4099, 384, generator=torch.Generator().manual_seed(1)).requires_grad_()
    w, b = torch.randn(2, 384, generator=torch.Generator().manual_seed(2)).requires_grad_().unbind(0)
    y = chargpt_kernels.layer_norm(x, (384,), w, b, backend="ext")
    results += [y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y) + x.detach())]
    for dropout_p in (0.0, 0.2):
        q, k, v = _qkv(2, 3, 200, 200, 64, seed=3)
        torch.manual_seed(5)
        out = chargpt_kernels.causal_attention(q, k, v, dropout_p=dropout_p, backend="ext")
        results += [out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out) + q.detach())]
    # Decoding: one query against 1001 keys, GQA 6/2, whose few tasks split their keys (flash-decoding).
    q, k, v = _qkv(1, 6, 1, 1001, 64, seed=4, grad=False)
    with chargpt_kernels.use_backend("ext"):
        results.append(chargpt_kernels.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True))
    return results


def test_thread_count_does_not_change_results():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_everything()
        torch.set_num_threads(2)
        two = _run_everything()
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


def test_bad_input_to_raw_ops_raises_runtime_error():
    ops = torch.ops.chargpt
    x, w = torch.randn(4, 8), torch.randn(8)
    q = torch.randn(1, 2, 5, 16)
    seed = torch.zeros(1, dtype=torch.int64)
    cases = [
        (lambda: ops.layer_norm_fwd(x, torch.randn(7), None, 1e-5), "weight must have shape"),
        (lambda: ops.layer_norm_fwd(x[0], w, None, 1e-5), "2-D"),
        (lambda: ops.layer_norm_fwd(x.double(), None, None, 1e-5), "float32"),
        (lambda: ops.layer_norm_fwd(x, w.double(), None, 1e-5), "weight is"),
        (lambda: ops.layer_norm_fwd(x, None, None, -1.0), "eps"),
        (lambda: ops.layer_norm_bwd(torch.randn(4, 9), x, w, torch.zeros(4), torch.ones(4)), "grad_out"),
        (lambda: ops.layer_norm_bwd(x, x, w, torch.zeros(3), torch.ones(4)), "mean must have shape"),
        (lambda: ops.attention_fwd(q, q[:, :1], q, True, 0.0, 1.0, None), "same shape"),
        (lambda: ops.attention_fwd(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), True, 0.0, 1.0, None),
         "agree"),
        (lambda: ops.attention_fwd(q[0], q[0], q[0], True, 0.0, 1.0, None), "4-D"),
        (lambda: ops.attention_fwd(*(torch.randn(1, 1, 2, 300),) * 3, True, 0.0, 1.0, None), "head dim"),
        (lambda: ops.attention_fwd(q, q, q, True, 0.5, 1.0, None), "seed"),
        (lambda: ops.attention_fwd(q, q, q, True, 0.5, 1.0, seed.int()), "int64"),
        (lambda: ops.attention_fwd(q, q, q, True, 1.5, 1.0, seed), "dropout_p"),
        (lambda: ops.attention_fwd(q.half(), q.half(), q.half(), True, 0.0, 1.0, None), "float32"),
        (lambda: ops.attention_fwd(q[:, :, :0], q, q, True, 0.0, 1.0, None), "sequence lengths"),
        (lambda: ops.attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 4), True, 0.0, 1.0, None), "lse"),
        (lambda: ops.attention_bwd(q[:, :, :3], q, q, q, q, torch.zeros(1, 2, 5), True, 0.0, 1.0, None), "grad_out"),
        (lambda: ops.attention_fwd(torch.randn(1, 3, 5, 16), q, q, True, 0.0, 1.0, None), "multiple of k's"),
        (lambda: ops.attention_fwd(q, q, q, False, 0.0, 1.0, None, torch.ones(1, 2, 5, 3, dtype=torch.bool)),
         "attn_mask must be a"),
        (lambda: ops.attention_fwd(q, q, q, False, 0.0, 1.0, None, torch.ones(1, 2, 5, 5, dtype=torch.int32)),
         "attn_mask must be bool or q's dtype"),
        (lambda: ops.attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 5), False, 0.0, 1.0, None,
                                   torch.zeros(1, 2, 5, 5).double()), "attn_mask must be bool or q's dtype"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_causal_with_more_queries_than_keys_and_long_rows():
    """Tq != Tk in both directions past a tile edge, against the float64 reference."""
    for tq, tk in ((130, 70), (70, 130)):
        q, k, v = _qkv(1, 2, tq, tk, 48, seed=tq)
        out = chargpt_kernels.causal_attention(q, k, v, backend="ext")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference.attention(q64, k64, v64, True)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["switched-off", "build-fails"])
def test_kernels_work_without_the_extension(tmp_path, how):
    """No extension: `import chargpt_kernels` still works, 'ext' is not listed, and asking for it says why."""
    env = checkout_env(CHARGPT_EXT_DIR=str(tmp_path / "ext"))
    if how == "switched-off":
        env["CHARGPT_EXT"] = "0"
    else:  # a fresh build folder and a compiler that always fails
        env["CXX"] = "false"
    code = ("import torch, chargpt_kernels\n"
            "print(chargpt_kernels.available_backends())\n"
            "y = chargpt_kernels.layer_norm(torch.randn(2, 4), (4,))\n"  # auto falls back to eager
            "chargpt_kernels.layer_norm(torch.randn(2, 4), (4,), backend='ext')\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "'ext'" not in run.stdout.splitlines()[0] and "'eager'" in run.stdout, run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("chargpt_kernels.runtime.BackendUnavailable: chargpt_kernels backend 'ext' is "
                           "unavailable"), last
