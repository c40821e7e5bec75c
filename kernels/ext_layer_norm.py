"""LayerNorm on the `ext` backend: the chargpt C++/CUDA ops (csrc/), with fake tensors for torch.compile. Autograd
is registered in C++ (csrc/ops.cpp: a Python register_autograd cost more per call than a small kernel).
Importing this module loads (or builds) the extension."""

import torch

from kernels import ext_build

ext_build.require()

_layer_norm_fwd = torch.ops.chargpt.layer_norm_fwd.default  # the overload itself: one Python hop fewer per call

SUPPORTED_DTYPES = {
    "cpu": (torch.float32,),
    "cuda": (torch.float32, torch.float16, torch.bfloat16) if ext_build.has_cuda_kernels() else (),
}


@torch.library.register_fake("chargpt::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps):
    m, n = x.shape
    stats = lambda: x.new_empty((m,), dtype=torch.float32)  # noqa: E731
    return x.new_empty((m, n)), stats(), stats()


@torch.library.register_fake("chargpt::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, x, weight, mean, rstd):
    n = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((n,)), x.new_empty((n,))


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim of x (M, N); weight and bias are (N,) or None."""
    return _layer_norm_fwd(x, weight, bias, eps)[0]
