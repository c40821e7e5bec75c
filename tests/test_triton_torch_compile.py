"""A tiny GPT block on the triton backend runs under torch.compile(fullgraph=True) and matches eager (CUDA only).

torch.compile of a Triton op cannot run on CPU (its fake-tensor pass needs a GPU device), so these skip there.
Two routes: through the public kernels API (what a model uses), and through the backend modules directly, so a
failure tells a dispatch problem (chargpt_kernels.api / chargpt_kernels.backends) apart from an op problem
(kernels/chargpt_kernels/triton_*.py).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import triton_attention, triton_layer_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB, CHANNELS, HEADS, BATCH, T = 65, 64, 4, 4, 48


def public_layer_norm(x, weight, bias):
    return chargpt_kernels.layer_norm(x, (x.shape[-1],), weight, bias, backend="triton")


def public_attention(q, k, v, dropout_p):
    return chargpt_kernels.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def direct_layer_norm(x, weight, bias):
    return triton_layer_norm.layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, 1e-5).view(x.shape)


def direct_attention(q, k, v, dropout_p):
    return triton_attention.attention(q, k, v, True, dropout_p, q.shape[-1] ** -0.5)


class TinyGPT(nn.Module):
    """Embedding, one pre-LN attention + MLP block (nanoGPT layout: (B, T, H, D) views transposed), head."""

    def __init__(self, layer_norm, attention, dropout_p):
        super().__init__()
        self.layer_norm, self.attention, self.dropout_p = layer_norm, attention, dropout_p
        self.embed = nn.Embedding(VOCAB, CHANNELS)
        self.norms = nn.ParameterList([nn.Parameter(1 + 0.1 * torch.randn(CHANNELS)) for _ in range(6)])
        self.qkv = nn.Linear(CHANNELS, 3 * CHANNELS)
        self.proj = nn.Linear(CHANNELS, CHANNELS)
        self.mlp = nn.Sequential(nn.Linear(CHANNELS, 4 * CHANNELS), nn.GELU(), nn.Linear(4 * CHANNELS, CHANNELS))
        self.head = nn.Linear(CHANNELS, VOCAB)

    def forward(self, idx, targets):
        w1, b1, w2, b2, w3, b3 = self.norms
        x = self.embed(idx)
        batch, t, c = x.shape
        q, k, v = self.qkv(self.layer_norm(x, w1, b1)).split(c, dim=2)
        q, k, v = (z.view(batch, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = self.attention(q, k, v, self.dropout_p if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(batch, t, c))
        x = x + self.mlp(self.layer_norm(x, w2, b2))
        logits = self.head(self.layer_norm(x, w3, b3))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def loss_and_grads(model, idx, targets):
    model.zero_grad()
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("route", ["public", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_model_matches_eager(route, dtype):
    ops = (public_layer_norm, public_attention) if route == "public" else (direct_layer_norm, direct_attention)
    torch.manual_seed(0)
    model = TinyGPT(*ops, dropout_p=0.1).to("cuda", dtype).eval()  # eval: no dropout, so both runs agree
    idx = torch.randint(0, VOCAB, (BATCH, T), device="cuda")
    targets = torch.randint(0, VOCAB, (BATCH, T), device="cuda")
    eager_loss, eager_grads = loss_and_grads(model, idx, targets)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = loss_and_grads(compiled, idx, targets)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss, eager_loss, rtol=tol, atol=tol)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))

    compiled.train()  # dropout inside the compiled kernels: runs, finite, and changes the loss
    train_loss, train_grads = loss_and_grads(compiled, idx, targets)
    assert torch.isfinite(train_loss) and all(torch.isfinite(g).all() for g in train_grads)
    assert train_loss != loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_opcheck_schemas_fake_tensors_and_autograd(dtype):
    """torch.library.opcheck: schema, fake (meta) outputs matching real ones, autograd registration, AOT dispatch."""
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = make(2, 3, 40, 32), make(2, 3, 40, 32), make(2, 3, 40, 32)
    seed = torch.tensor([1234], device="cuda", dtype=torch.int64)
    mask = torch.rand(2, 1, 1, 40, device="cuda") > 0.3
    for args in [(q, k, v, None, None, True, 0.0, 0.2), (q, k, v, seed, None, False, 0.1, 0.2),
                 (q, k[:, :1], v[:, :1], None, mask.expand(2, 3, 40, 40), False, 0.0, 0.2)]:
        torch.library.opcheck(triton_attention.attention_forward, args)
    x, w, b = make(50, 200), make(200), make(200)
    for args in [(x, w, b, 1e-5), (x, None, None, 1e-5)]:
        torch.library.opcheck(triton_layer_norm.layer_norm_forward, args)
    for args in [(x, w, 1e-6), (x, None, 1e-6)]:
        torch.library.opcheck(triton_layer_norm.rms_norm_forward, args)
    residual = make(50, 200)
    for args in [(x, residual, w, b, None, 1e-5, "layer", 0.0), (x, residual, w, b, seed, 1e-5, "layer", 0.1),
                 (x, residual, w, None, seed, 1e-6, "rms", 0.1), (x, residual, None, None, None, 1e-6, "rms", 0.0)]:
        torch.library.opcheck(triton_layer_norm.add_norm_forward, args)
