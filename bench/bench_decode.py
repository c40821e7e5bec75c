"""Decoding with the KV cache: greedy tokens/s of a GPT the gpt preset's size (6 layers, 6 heads, 384 wide,
block_size 1024; random init) extending a 1000-token prompt one token at a time, so each attention call is Tq = 1
against a cache of Tk = 1001..1016 keys. Eager (chargpt_kernels.reference, composed torch ops) is the baseline.

Each case first checks that GPT.generate on the backend decodes eager's greedy tokens, and that the timed loop
(GPT.generate's own steps, from a cache prefilled once outside the timing) decodes the same tokens."""

import dataclasses
import functools

import pytest
import torch

import chargpt_kernels
from bench.common import DEVICE, skip_unless_runnable
from chargpt.model import ModelConfig, build_model, sample_next

CONFIG = ModelConfig(vocab_size=65, block_size=1024, n_layer=6, n_head=6, n_embd=384, dropout=0.0)
PROMPT_TOKENS = 1000
NEW_TOKENS = 16  # decode steps per timed call; small, since under --benchmark-disable (CI) each case runs once
BACKENDS = ("eager", "triton", "ext") if DEVICE == "cuda" else ("eager", "ext")
# Greedy decoding may part from eager's only where eager's two best logits lie this close (TF32 dots on a GPU).
TIE = 5e-3 if DEVICE == "cuda" else 1e-5


@functools.cache
def model_for(backend):
    """The same random weights, built to run on `backend`."""
    torch.manual_seed(0)
    model = build_model(CONFIG).to(DEVICE).eval()
    if backend == "eager":
        return model
    other = build_model(dataclasses.replace(CONFIG, kernels=backend)).to(DEVICE).eval()
    other.load_state_dict(model.state_dict())
    return other


@functools.cache
def prompt():
    return torch.randint(CONFIG.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)).to(DEVICE)


@functools.cache
def eager_tokens():
    return model_for("eager").generate(prompt(), NEW_TOKENS + 1, temperature=0)


@torch.no_grad()
def decode(model, cache, token, steps):
    """GPT.generate's cached steps: `steps` greedy tokens after `token`, from the prefilled KV cache, cropped back
    to the prompt first, so every timed call starts from the same Tk."""
    tokens = []
    cache.crop(PROMPT_TOKENS)
    with chargpt_kernels.use_backend(model.config.kernels):
        for _ in range(steps):
            logits, cache = model.next_token_logits(token, cache)
            token = sample_next(logits, temperature=0)
            tokens.append(token)
    return torch.cat(tokens, dim=1)


def assert_greedy_tokens_match(got, want):
    """got equals want (eager's), except that where eager's two best logits lie within TIE, a kernel's rounding
    may pick the other token, after which the texts part."""
    differ = (got != want).nonzero()
    if differ.numel() == 0:
        return
    i = int(differ[0, 1])
    with torch.no_grad():
        logits = model_for("eager")(want[:, :i])[0][0, -1]
    gap = float(logits[want[0, i]] - logits[got[0, i]])
    assert gap <= TIE, f"token {i - PROMPT_TOKENS} differs from eager's, whose logit is {gap:.2e} above it"


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode(timed, backend):
    skip_unless_runnable(backend)
    model = model_for(backend)
    with torch.no_grad(), chargpt_kernels.use_backend(model.config.kernels):
        logits, cache = model.next_token_logits(prompt())  # the prefill, outside the timing
    first = sample_next(logits, temperature=0)

    def check():
        generated = eager_tokens() if backend == "eager" else model.generate(prompt(), NEW_TOKENS + 1, temperature=0)
        assert_greedy_tokens_match(generated, eager_tokens())
        assert torch.equal(first, generated[:, PROMPT_TOKENS:PROMPT_TOKENS + 1])
        assert torch.equal(decode(model, cache, first, NEW_TOKENS), generated[:, PROMPT_TOKENS + 1:])

    info = dict(op="decode", mode="greedy, KV cache", dtype="float32",
                shape=f"B 1, Tk {PROMPT_TOKENS + 1}..{PROMPT_TOKENS + NEW_TOKENS}, "
                      f"L {CONFIG.n_layer} H {CONFIG.n_head} C {CONFIG.n_embd}")
    timed(lambda: decode(model, cache, first, NEW_TOKENS), f"decode {info['shape']}", backend, info,
          {"tokens": NEW_TOKENS}, check, baseline="eager")
