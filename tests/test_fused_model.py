"""The fused backends inside whole models: chargpt's GPT, and a model that is not chargpt's."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chargpt_kernels
from chargpt.model import ModelConfig, build_model

from conftest import FUSED_BACKENDS, assert_close, require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=48, bias=True)


def gpt(backend, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**TINY, dropout=dropout, kernels=backend)).to(DEVICE)


def batch(seed=1, size=4):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, TINY["vocab_size"], (2, size, TINY["block_size"]), generator=gen)
    return xy[0].to(DEVICE), xy[1].to(DEVICE)


def loss_and_grads(model, x, y):
    _, loss = model(x, y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss, grads


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gpt_loss_and_gradients_match_eager(backend):
    """Same weights, dropout 0: every fused backend gives the eager model's loss and every parameter gradient."""
    require_backend(backend, DEVICE)
    eager, fused = gpt("eager"), gpt(backend)
    fused.load_state_dict(eager.state_dict())
    x, y = batch()
    want_loss, want = loss_and_grads(eager, x, y)
    loss, got = loss_and_grads(fused, x, y)
    assert_close(loss, want_loss, torch.float32, f"{backend} loss")
    names = [n for n, _ in fused.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} grad {name}: {m}")


@pytest.mark.parametrize("backend", ("eager",) + FUSED_BACKENDS)
def test_training_with_dropout_lowers_the_loss_like_eager(backend):
    """With attention dropout drawn inside the kernels, a few AdamW steps on one batch cut the loss as eager does."""
    require_backend(backend, DEVICE)

    def loss_drop(name):
        model = gpt(name, dropout=0.2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x, y = batch(size=8)
        losses = []
        for _ in range(25):
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses[0] - min(losses[-5:])

    drop, eager_drop = loss_drop(backend), loss_drop("eager")
    assert eager_drop > 0.5, f"eager itself did not learn ({eager_drop:.3f})"
    assert abs(drop - eager_drop) < 0.25 * eager_drop, f"{backend} loss fell by {drop:.3f}, eager by {eager_drop:.3f}"


def test_gpt_compiles_fullgraph_with_the_cpu_extension():
    """--compile with --fused on CPU: the ext custom ops trace without graph breaks and give eager's numbers."""
    require_backend("ext", "cpu")
    if DEVICE != "cpu":
        pytest.skip("the CUDA compile path is tested in the Triton and ext CUDA tests")
    eager, fused = gpt("eager"), gpt("ext")
    fused.load_state_dict(eager.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    x, y = batch()
    want_loss, want = loss_and_grads(eager, x, y)
    loss, got = loss_and_grads(compiled, x, y)
    assert_close(loss, want_loss, torch.float32, "compiled ext loss")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_generate_decodes_through_the_backends_attention(monkeypatch, backend):
    """GPT.generate's KV-cache steps (Tq = 1 against the cache) run attention on the model's fused backend, never
    torch's fallback or eager, and greedy decoding gives eager's tokens."""
    require_backend(backend, DEVICE)
    fallbacks, chosen = [], []
    torch_sdpa, choose = chargpt_kernels.api._torch_sdpa, chargpt_kernels.backends.choose

    def counting_sdpa(*args, **kwargs):
        fallbacks.append(args[0].shape)
        return torch_sdpa(*args, **kwargs)

    def recording(name, op, tensor, *args, **kwargs):
        backend_and_fn = choose(name, op, tensor, *args, **kwargs)
        if op == "attention":
            chosen.append((backend_and_fn[0], tensor.shape[2]))  # (backend, Tq)
        return backend_and_fn

    eager, fused = gpt("eager").eval(), gpt(backend).eval()
    fused.load_state_dict(eager.state_dict())
    prompt, new_tokens = batch(size=2)[0][:, :5], 10
    want = eager.generate(prompt, new_tokens, temperature=0)
    monkeypatch.setattr(chargpt_kernels.api, "_torch_sdpa", counting_sdpa)
    monkeypatch.setattr(chargpt_kernels.backends, "choose", recording)
    got = fused.generate(prompt, new_tokens, temperature=0)
    assert fallbacks == []
    assert {name for name, _ in chosen} == {backend}
    assert sum(tq == 1 for _, tq in chosen) == (new_tokens - 1) * TINY["n_layer"]  # every step after the prefill
    if DEVICE == "cuda":
        pytest.skip("TF32 dots may flip near-tied greedy tokens; test_model checks the cached decode's logits")
    assert torch.equal(got, want)


class ForeignBlock(nn.Module):
    """Not chargpt's: a pre-LN block with fused qkv, written against F.scaled_dot_product_attention."""

    def __init__(self, dim=40, heads=4, sdpa=F.scaled_dot_product_attention):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.final = nn.LayerNorm(dim, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = self.sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        return self.final(x + self.out(y))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_a_foreign_model_uses_the_kernels_through_patch_model(backend):
    require_backend(backend, DEVICE)
    torch.manual_seed(0)
    reference = ForeignBlock().to(DEVICE)
    patched = chargpt_kernels.patch_model(copy.deepcopy(reference), backend=backend)
    patched.sdpa = chargpt_kernels.scaled_dot_product_attention
    assert isinstance(patched.norm, chargpt_kernels.LayerNorm) and isinstance(patched.final, chargpt_kernels.LayerNorm)
    x = torch.randn(3, 21, 40, device=DEVICE, requires_grad=True)
    with chargpt_kernels.use_backend(backend):
        got = patched(x)
    want = reference(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, *patched.parameters()], g)
    want_grads = torch.autograd.grad(want, [x, *reference.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
