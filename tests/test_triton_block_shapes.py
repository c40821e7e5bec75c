"""Every block shape the GPU autotuner may pick computes the right thing, checked on CPU under the interpreter.

The generic tests run one config per kernel there (multi-config autotune does not work in the interpreter); here
each GPU config of each kernel list is forced in turn on shapes that hit tails, the diagonal and BLOCK_M !=
BLOCK_N, with dropout on, against the float64 reference with the same Philox mask.
"""

import pytest
import torch

from chargpt_kernels import reference
from chargpt_kernels import triton_attention as attention
from chargpt_kernels.runtime import triton_interpreted

from conftest import assert_close

ALL_CONFIGS = {name: attention.CONFIGS[name] + attention.FP32_CONFIGS[name] for name in attention.CONFIGS}
RUNS = max(len(configs) for configs in ALL_CONFIGS.values())


def _label(index):
    return ",".join(f"{name[:3]}{configs[min(index, len(configs) - 1)].kwargs['BLOCK_M']}x"
                    f"{configs[min(index, len(configs) - 1)].kwargs['BLOCK_N']}"
                    for name, configs in ALL_CONFIGS.items())


@pytest.mark.skipif(not triton_interpreted(), reason="forces configs through the interpreter's single-config path")
@pytest.mark.parametrize("index", range(RUNS), ids=_label)
@pytest.mark.parametrize("b,h,tq,tk,d,is_causal", [(1, 2, 77, 77, 24, True), (2, 1, 45, 70, 40, False)],
                         ids=["causal-77", "full-45x70"])
def test_every_config_matches_reference(monkeypatch, index, b, h, tq, tk, d, is_causal):
    forced = {name: configs[min(index, len(configs) - 1):][:1] for name, configs in ALL_CONFIGS.items()}
    monkeypatch.setattr(attention, "INTERPRETER_CONFIGS", forced)
    monkeypatch.setattr(attention, "_autotuners", {})
    gen = torch.Generator().manual_seed(index)
    q = torch.randn(b, tq, h, d, generator=gen).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(b, h, tk, d, generator=gen).requires_grad_() for _ in range(2))
    p = 0.25
    torch.manual_seed(index)
    seed = int(reference.new_dropout_seed("cpu"))
    mask = reference.dropout_keep_mask(seed, b, h, tq, tk, p)
    torch.manual_seed(index)
    out = attention.attention(q, k, v, is_causal, p, 0.2)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, is_causal, p, 0.2, dropout_mask=mask)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double()))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, w, torch.float32, f"{_label(index)} {name}")


@pytest.mark.parametrize("programs,t_k,block_n,sms", [(1, 4096, 64, 132), (6, 1001, 32, 132), (64, 8192, 64, 132),
                                                      (2, 300, 64, 4), (1, 256, 32, 132), (200, 2048, 64, 132)])
def test_decode_splits_cover_the_keys_in_whole_tiles(programs, t_k, block_n, sms):
    """The split-KV rule: whole key tiles, every key in exactly one split, none empty, none shorter than
    DECODE_SPLIT_KEYS, and no more programs than about DECODE_PROGRAMS_PER_SM per SM once there are enough."""
    splits, split_len = attention.decode_splits(programs, t_k, block_n, sms)
    assert split_len % block_n == 0 and (splits - 1) * split_len < t_k <= splits * split_len
    assert split_len >= min(t_k, attention.DECODE_SPLIT_KEYS)
    assert splits == 1 or programs * (splits - 1) < attention.DECODE_PROGRAMS_PER_SM * sms
