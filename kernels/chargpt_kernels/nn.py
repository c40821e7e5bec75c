"""Module-level drop-ins: chargpt_kernels.LayerNorm for nn.LayerNorm, chargpt_kernels.RMSNorm for nn.RMSNorm, and
patch_model to swap them (and a model's own norm classes) into any model."""

from typing import Callable, Optional, Union

import torch.nn as nn

from chargpt_kernels.api import layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with the same arguments, parameters and state_dict keys, computed by `chargpt_kernels.layer_norm`.

    `backend` pins one backend (eager, triton, ext, auto); None follows `chargpt_kernels.use_backend`.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self):
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend else "")


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with the same arguments, parameters and state_dict keys, computed by `chargpt_kernels.rms_norm`.

    `backend` pins one backend (eager, triton, ext, auto); None follows `chargpt_kernels.use_backend`.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    def extra_repr(self):
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend else "")


def _fused_like(module, kind, backend):
    """A kernels norm sharing `module`'s parameter objects (so optimizers built before the patch stay valid).

    A user's own class is read by convention: `weight` (and `bias` for layer), and its epsilon from `eps` or
    `variance_epsilon` (the Llama family's name), else torch's default."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    shape = getattr(module, "normalized_shape", None) or (tuple(weight.shape) if weight is not None else None)
    if shape is None:
        raise TypeError(f"patch_model: cannot tell the normalized shape of {type(module).__name__} (no weight)")
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if kind == "layer":
        fused = LayerNorm(shape, 1e-5 if eps is None else eps, elementwise_affine=False, bias=False, backend=backend)
        fused.weight, fused.bias = weight, bias
    elif kind == "rms":
        if bias is not None:
            raise TypeError(f"patch_model: {type(module).__name__} has a bias, which RMSNorm does not")
        fused = RMSNorm(shape, eps, elementwise_affine=False, backend=backend)
        fused.weight = weight
    else:
        raise ValueError(f"patch_model: a norm kind is 'layer' or 'rms' (or a function), got {kind!r}")
    fused.elementwise_affine = weight is not None
    fused.train(module.training)
    return fused


def patch_model(model: nn.Module, backend: Optional[str] = None,
                norms: Optional[dict[type, Union[str, Callable[[nn.Module], nn.Module]]]] = None) -> nn.Module:
    """Swap every nn.LayerNorm and nn.RMSNorm inside `model` for the kernels drop-in sharing the same parameters.

    Arguments:
        model: any nn.Module; it is changed in place and returned.
        backend: the backend the new modules pin (None: follow `chargpt_kernels.use_backend`).
        norms: a model's own norm classes that compute the same thing, each mapped to "layer" or "rms" (weights
            and epsilon read as `_fused_like` says) or to a function building the replacement, e.g.
            `{LlamaRMSNorm: "rms", nanogpt.LayerNorm: "layer"}`.

    Returns:
        `model`.
    """
    kinds = {nn.LayerNorm: "layer", nn.RMSNorm: "rms", **(norms or {})}
    if type(model) in kinds:
        raise TypeError(f"patch_model: pass the model that contains the {type(model).__name__}, not the norm itself")
    for name, child in list(model.named_children()):
        kind = kinds.get(type(child))  # exact types: the drop-ins themselves subclass nn.LayerNorm / nn.RMSNorm
        if kind is None:
            patch_model(child, backend, norms)
        else:
            setattr(model, name, kind(child) if callable(kind) else _fused_like(child, kind, backend))
    return model
