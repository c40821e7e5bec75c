"""LayerNorm on the `ext` backend: the chargpt C++/CUDA ops (csrc/), with fake tensors and autograd for
torch.compile. Importing this module loads (or builds) the extension."""

import torch

from kernels import ext_build

ext_build.require()

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


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.chargpt.layer_norm_bwd(grad_y, x, weight, mean, rstd)
    return dx, (dweight if weight is not None else None), (dbias if ctx.has_bias else None), None


torch.library.register_autograd("chargpt::layer_norm_fwd", _backward, setup_context=_setup_context)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim of x (M, N); weight and bias are (N,) or None."""
    return torch.ops.chargpt.layer_norm_fwd(x, weight, bias, eps)[0]
