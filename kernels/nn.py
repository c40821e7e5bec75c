"""Module-level drop-ins: kernels.LayerNorm for nn.LayerNorm, and patch_model to swap them into any model."""

import torch.nn as nn

from kernels.api import layer_norm


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with the same arguments, parameters and state_dict keys, computed by `kernels.layer_norm`.

    `backend` pins one backend (eager, triton, ext, auto); None follows `kernels.use_backend`.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self):
        backend = f", backend={self.backend!r}" if self.backend else ""
        return super().extra_repr() + backend


def patch_model(model, backend=None):
    """Swap every nn.LayerNorm inside `model` for a kernels.LayerNorm sharing the same parameter objects.

    Sharing (not copying) the parameters keeps optimizers built before the patch valid. Returns `model`.
    """
    if isinstance(model, nn.LayerNorm) and not isinstance(model, LayerNorm):
        raise TypeError("patch_model: pass the model that contains the nn.LayerNorm, not the LayerNorm itself")
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LayerNorm) and not isinstance(child, LayerNorm):
            fused = LayerNorm(child.normalized_shape, child.eps, elementwise_affine=False, bias=False,
                              backend=backend)
            fused.weight, fused.bias = child.weight, child.bias
            fused.train(child.training)
            setattr(model, name, fused)
        else:
            patch_model(child, backend)
    return model
