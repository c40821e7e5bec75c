"""Other people's models: Hugging Face transformers built from config (no download), with F.sdpa swapped for
kernels' and their norms patched. Logits and every parameter gradient must match the same model on torch's own
ops, with padding masks and GQA, and no attention call may fall back to torch.
"""

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels.testing import assert_close

from conftest import FUSED_BACKENDS, require_attention_features, require_backend

transformers = pytest.importorskip("transformers")


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_positions=64,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config), None


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=96,
                                     vocab_size=97, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                                     hidden_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config), None


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                      hidden_size=96, intermediate_size=128, vocab_size=97,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    return model, {type(model.model.norm): "rms"}  # LlamaRMSNorm computes what chargpt_kernels.rms_norm does


MODELS = {"gpt2": gpt2, "bert": bert, "llama": llama}


def batch(padding, t=13, b=3):
    """Token ids and an attention mask: no padding, or b rows of decreasing length padded on the left or right."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    if padding != "none":
        for row in range(1, b):
            pad = 3 * row
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, t - pad:] = 0
    return ids, mask


def run(model, ids, mask):
    """Logits and the gradient of every parameter under one fixed upstream gradient."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * upstream).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fused_sdpa(monkeypatch):
    """F.sdpa -> chargpt_kernels.scaled_dot_product_attention, counting the calls that reach torch's own."""
    torch_sdpa = chargpt_kernels.api._torch_sdpa
    calls = {"fallbacks": 0, "fused": 0, "torch": torch_sdpa}

    def counting_torch_sdpa(*args, **kwargs):
        calls["fallbacks"] += 1
        return torch_sdpa(*args, **kwargs)

    def counting_kernels_sdpa(*args, **kwargs):
        calls["fused"] += 1
        return chargpt_kernels.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(chargpt_kernels.api, "_torch_sdpa", counting_torch_sdpa)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_kernels_sdpa)
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # GQA reaches sdpa as enable_gqa even with a mask
    return calls


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name,padding", [("gpt2", "none"), ("gpt2", "left"), ("gpt2", "right"), ("bert", "right"),
                                          ("llama", "none"), ("llama", "left")])
def test_model_matches_torch_and_never_falls_back(backend, name, padding, fused_sdpa):
    require_attention_features(backend, "cpu", torch.float32, ("mask", "gqa"))
    if name == "llama":
        require_backend(backend, "cpu", ops=("rms_norm",))
    torch.manual_seed(0)
    model, own_norms = MODELS[name]()
    model.config._attn_implementation = "sdpa"
    ids, mask = batch(padding)
    with pytest.MonkeyPatch.context() as original:
        original.setattr(F, "scaled_dot_product_attention", fused_sdpa["torch"])
        want_logits, want_grads = run(model, ids, mask)
    chargpt_kernels.patch_model(model, norms=own_norms)
    with chargpt_kernels.use_backend(backend):
        logits, grads = run(model, ids, mask)
    assert fused_sdpa["fused"] > 0 and fused_sdpa["fallbacks"] == 0, {k: fused_sdpa[k] for k in ("fused", "fallbacks")}
    real = mask.bool()  # padded positions' logits are garbage in both; compare the real tokens
    assert_close(logits[real], want_logits[real], torch.float32, f"{name} {padding} logits")
    assert grads.keys() == want_grads.keys()
    for key in grads:
        assert_close(grads[key], want_grads[key], torch.float32, f"{name} {padding} grad {key}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_llama_generate_matches_torch_and_never_falls_back(backend, fused_sdpa):
    require_attention_features(backend, "cpu", torch.float32, ("mask", "gqa"))
    require_backend(backend, "cpu", ops=("rms_norm",))
    torch.manual_seed(0)
    model, own_norms = llama()
    model.config._attn_implementation = "sdpa"
    model.eval()
    ids, mask = batch("left", t=7, b=2)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pytest.MonkeyPatch.context() as original:
        original.setattr(F, "scaled_dot_product_attention", fused_sdpa["torch"])
        want = model.generate(input_ids=ids, attention_mask=mask, **settings)
    chargpt_kernels.patch_model(model, norms=own_norms)
    with chargpt_kernels.use_backend(backend):
        got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert fused_sdpa["fused"] > 0 and fused_sdpa["fallbacks"] == 0, {k: fused_sdpa[k] for k in ("fused", "fallbacks")}
    assert torch.equal(got, want)
