"""chargpt's GPT on its add_norm path (each residual add, its dropout and the next norm in one chargpt_kernels.add_norm)
against its plain path: the same logits and gradients, the same learning with dropout, the same checkpoints, a
working KV cache; and the models that must keep the plain path (eager, a backend without add_norm, the ladder's
rungs without residual paths, norms or MLPs) keep it."""

import importlib
from dataclasses import replace

import pytest
import torch

import chargpt.model
import chargpt_kernels
from chargpt.model import ModelConfig, build_model
from chargpt.presets import get_preset

from conftest import FUSED_BACKENDS, require_backend

TINY = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=48, bias=True, kernels="auto")
ADDS_PER_FORWARD = 2 * TINY.n_layer  # one after attention, one after the MLP, in every block


def gpt(config, use_add_norm=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(config)
    model.use_add_norm = use_add_norm
    return model


def batch(config, seed=1, size=4):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(config.vocab_size, (2, size, config.block_size), generator=g)
    return xy[0], xy[1]


@pytest.fixture
def add_norm_calls(monkeypatch):
    """The dropout_p of every chargpt_kernels.add_norm call the model makes."""
    calls, add_norm = [], chargpt_kernels.add_norm

    def counting(*args, **kwargs):
        calls.append(kwargs["dropout_p"])
        return add_norm(*args, **kwargs)

    monkeypatch.setattr(chargpt_kernels, "add_norm", counting)
    return calls


def logits_and_grads(model, x, y):
    logits, loss = model(x, y)
    return logits, torch.autograd.grad(loss, list(model.parameters()))


def assert_same_logits_and_grads(model, reference, x, y, rtol=1e-5, atol=1e-6):
    logits, grads = logits_and_grads(model, x, y)
    want_logits, want_grads = logits_and_grads(reference, x, y)
    torch.testing.assert_close(logits, want_logits, rtol=rtol, atol=atol)
    for (name, _), a, b in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_add_norm_path_gives_the_plain_paths_logits_and_gradients(add_norm_calls, bias):
    """Dropout 0, kernels auto on CPU, same weights: the add_norm path computes what the plain path does."""
    config = replace(TINY, bias=bias)
    plain, fused = gpt(config, use_add_norm=False), gpt(config, use_add_norm=True)
    fused.load_state_dict(plain.state_dict())
    x, y = batch(config)
    assert_same_logits_and_grads(fused, plain, x, y)
    assert add_norm_calls == [0.0] * ADDS_PER_FORWARD  # the fused model's one forward; the plain one made none


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_a_backend_with_an_add_norm_kernel_takes_the_add_norm_path(add_norm_calls, backend):
    """Left to choose (use_add_norm None), a model on a backend with a fused add_norm kernel uses it, and gives
    eager's logits and gradients."""
    require_backend(backend, "cpu", ops=("layer_norm", "attention", "add_norm"))
    eager, fused = gpt(replace(TINY, kernels="eager")), gpt(replace(TINY, kernels=backend))
    fused.load_state_dict(eager.state_dict())
    x, y = batch(TINY)
    assert_same_logits_and_grads(fused, eager, x, y, rtol=1e-4, atol=1e-5)
    assert len(add_norm_calls) == ADDS_PER_FORWARD


@pytest.mark.parametrize("backend", ["eager", "ext", "auto"])
def test_the_model_uses_add_norm_only_where_a_fused_kernel_runs_it(add_norm_calls, backend):
    """eager keeps the plain reference path; a backend without an add_norm kernel (ext until it has one) runs the
    plain path instead of raising; one with the kernel uses it (auto on CPU: ext's)."""
    if backend != "eager":
        require_backend("ext", "cpu")
    model = gpt(replace(TINY, kernels=backend))
    x, y = batch(TINY, size=1)
    _, loss = model(x, y)
    loss.backward()
    has_kernel = backend != "eager" and hasattr(importlib.import_module("chargpt_kernels.ext_layer_norm"), "add_norm")
    assert len(add_norm_calls) == (ADDS_PER_FORWARD if has_kernel else 0)


@pytest.mark.parametrize("switches", [{"residual": False}, {"layernorm": False}, {"mlp": False}],
                         ids=["no-residual", "no-layernorm", "no-mlp"])
def test_ladder_rungs_keep_the_plain_path(monkeypatch, add_norm_calls, switches):
    """Without residual paths, norms or MLPs a block has no add followed by a norm: never add_norm, even where
    the backend has the kernel or the model is asked to."""
    has_fused_kernel = chargpt.model.has_fused_kernel
    monkeypatch.setattr(chargpt.model, "has_fused_kernel",
                        lambda op, *args: op == "add_norm" or has_fused_kernel(op, *args))
    config = replace(TINY, **switches)
    for use_add_norm in (None, True):
        model = gpt(config, use_add_norm)
        x, y = batch(config, size=1)
        _, loss = model(x, y)
        loss.backward()
        model.eval().generate(x[:, :3], 3, temperature=0)
    assert add_norm_calls == []


def test_state_dict_is_the_same_on_both_paths():
    """Checkpoints move between the paths and backends: same keys, and an eager model's weights give the same
    loss on the add_norm path."""
    eager, fused = gpt(replace(TINY, kernels="eager")), gpt(TINY, use_add_norm=True, seed=1)
    assert list(eager.state_dict()) == list(fused.state_dict()) == list(gpt(TINY, use_add_norm=False).state_dict())
    fused.load_state_dict(eager.state_dict())
    x, y = batch(TINY)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, y)[1], eager(x, y)[1], rtol=1e-5, atol=1e-6)


def test_dropout_is_drawn_in_training_only(add_norm_calls):
    """Residual dropout moves into add_norm: drawn in train mode (two forwards differ), none in eval mode (which
    matches the plain path)."""
    config = replace(TINY, dropout=0.2)
    fused, plain = gpt(config, use_add_norm=True), gpt(config, use_add_norm=False).eval()
    x, _ = batch(config, size=2)
    with torch.no_grad():
        first, second = fused(x)[0], fused(x)[0]
        assert not torch.allclose(first, second)
        assert add_norm_calls == [0.2] * (2 * ADDS_PER_FORWARD)
        torch.testing.assert_close(fused.eval()(x)[0], plain(x)[0], rtol=1e-5, atol=1e-6)
    assert add_norm_calls[-ADDS_PER_FORWARD:] == [0.0] * ADDS_PER_FORWARD


def test_training_with_dropout_lowers_the_loss_like_eager():
    """The tiny preset (dropout 0.1), 30 AdamW steps on one batch: the add_norm path's loss falls as eager's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread on a busy machine
    config = replace(get_preset("tiny").model, vocab_size=65)
    x, y = batch(config, size=8)

    def final_loss(kernels_name, use_add_norm):
        model = gpt(replace(config, kernels=kernels_name), use_add_norm)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses[0], sum(losses[-5:]) / 5

    try:
        first, eager_final = final_loss("eager", None)
        _, fused_final = final_loss("auto", True)
    finally:
        torch.set_num_threads(threads)
    assert first - eager_final > 0.5, f"eager itself did not learn ({first:.3f} -> {eager_final:.3f})"
    assert abs(fused_final - eager_final) < 0.2 * (first - eager_final), (fused_final, eager_final)


def test_kv_cache_on_the_add_norm_path():
    """Decoding token by token from the cache gives the full forward's logits, and greedy generation with the cache
    gives the tokens of generation without it and of the plain path."""
    config = replace(TINY, block_size=24)
    fused, plain = gpt(config, use_add_norm=True).eval(), gpt(config, use_add_norm=False).eval()
    idx = torch.randint(65, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), chargpt_kernels.use_backend(config.kernels):
        full, _ = fused(idx)
        logits, cache = fused.next_token_logits(idx[:, :6])
        steps = [logits]
        for t in range(6, 12):
            logits, cache = fused.next_token_logits(idx[:, t:t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:12], rtol=1e-5, atol=1e-5)
    cached, recomputed, want = (model.generate(idx[:, :4], 10, temperature=0, use_cache=use_cache)
                                for model, use_cache in ((fused, True), (fused, False), (plain, True)))
    assert torch.equal(cached, recomputed) and torch.equal(cached, want)
