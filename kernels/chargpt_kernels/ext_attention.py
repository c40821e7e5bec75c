"""Attention on the `ext` backend: the chargpt C++/CUDA ops (csrc/), with fake tensors for torch.compile (autograd
is registered in C++, csrc/ops.cpp). Dropout draws one seed per call from torch's generator; the kernels regenerate
the mask from it (Philox, kernels/chargpt_kernels/reference.py) in the backward. Importing this module loads (or builds)
the extension."""

import torch

from chargpt_kernels import ext_build, reference

ext_build.require()

_attention_fwd = torch.ops.chargpt.attention_fwd.default  # the overload itself: one Python hop fewer per call

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16) if ext_build.has_cuda_kernels() else (),
}
# attn_mask and GQA are fused in the CPU and the CUDA kernels.
SUPPORTED_FEATURES = {"cpu": ("mask", "gqa"), "cuda": ("mask", "gqa")}


@torch.library.register_fake("chargpt::attention_fwd")
def _attention_fwd_fake(q, k, v, is_causal, dropout_p, scale, seed, attn_mask=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("chargpt::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, is_causal, dropout_p, scale, seed, attn_mask=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def attention(q, k, v, is_causal, dropout_p, scale, attn_mask=None):
    """softmax(q k^T * scale + mask) v for q (B, Hq, Tq, D), k and v (B, Hk, Tk, D) (Hq a multiple of Hk); causal
    is top-left aligned; attn_mask is None or a (B, Hq, Tq, Tk) view."""
    seed = reference.new_dropout_seed(q.device) if dropout_p > 0.0 else None
    return _attention_fwd(q, k, v, is_causal, dropout_p, scale, seed, attn_mask)[0]
