"""The norm family on the `ext` backend (layer_norm, rms_norm, add_norm): the chargpt C++/CUDA ops (csrc/), with fake
tensors for torch.compile. Autograd is registered in C++ (csrc/ops.cpp: a Python register_autograd cost more per
call than a small kernel). add_norm's dropout draws one seed per call from torch's generator; the kernels regenerate
the mask from it (Philox, kernels/chargpt_kernels/reference.py) in the backward. Importing this module loads (or builds)
the extension."""

import torch

from chargpt_kernels import ext_build, reference

ext_build.require()

# The overloads themselves: one Python hop fewer per call.
_layer_norm_fwd = torch.ops.chargpt.layer_norm_fwd.default
_rms_norm_fwd = torch.ops.chargpt.rms_norm_fwd.default
_add_norm_fwd = torch.ops.chargpt.add_norm_fwd.default

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),  # 16-bit: rows through float32 scratch, fp32 statistics
    "cuda": (torch.float32, torch.float16, torch.bfloat16) if ext_build.has_cuda_kernels() else (),
}


def _row_stats(x):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("chargpt::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps):
    return x.new_empty(x.shape), _row_stats(x), _row_stats(x)


@torch.library.register_fake("chargpt::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, x, weight, mean, rstd):
    n = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((n,)), x.new_empty((n,))


@torch.library.register_fake("chargpt::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps):
    return x.new_empty(x.shape), _row_stats(x)


@torch.library.register_fake("chargpt::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, x, weight, rstd):
    return x.new_empty(x.shape), x.new_empty((x.shape[1],))


@torch.library.register_fake("chargpt::add_norm_fwd")
def _add_norm_fwd_fake(x, residual, weight, bias, eps, norm, dropout_p, seed):
    return x.new_empty(x.shape), x.new_empty(x.shape), _row_stats(x), _row_stats(x)


@torch.library.register_fake("chargpt::add_norm_bwd")
def _add_norm_bwd_fake(grad_y, grad_h, h, weight, mean, rstd, norm, dropout_p, seed):
    n = h.shape[1]
    dx = h.new_empty(h.shape if dropout_p > 0.0 else (0,))  # without dropout x's gradient is h's (dh)
    return h.new_empty(h.shape), dx, h.new_empty((n,)), h.new_empty((n,))


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim of x (M, N); weight and bias are (N,) or None."""
    return _layer_norm_fwd(x, weight, bias, eps)[0]


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim of x (M, N): x / sqrt(mean(x^2) + eps) * weight; weight is (N,) or None, eps None
    means torch's default (float32's machine epsilon)."""
    return _rms_norm_fwd(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)[0]


def add_norm(x, residual, weight, bias, eps, norm, dropout_p):
    """(y, h): h = residual + dropout(x), y = norm(h) ("layer" or "rms") over the last dim of x, residual (M, N)."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    seed = reference.new_dropout_seed(x.device) if dropout_p > 0.0 else None  # the call's first random draw
    y, h, _, _ = _add_norm_fwd(x, residual, weight, bias, eps, norm, dropout_p, seed)
    return y, h
