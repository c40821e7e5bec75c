"""chargpt kernels: fused causal attention and LayerNorm for any PyTorch model.

    import kernels
    y = kernels.layer_norm(x, (C,), weight, bias)               # F.layer_norm-compatible
    o = kernels.scaled_dot_product_attention(q, k, v, is_causal=True)  # F.sdpa-compatible
    kernels.patch_model(model)                                 # every nn.LayerNorm -> kernels.LayerNorm

Backends: eager (kernels.reference, the ground truth), triton (kernels/triton_*.py), ext (csrc/, a C++/CUDA
extension). `auto` (the default) picks triton for CUDA tensors and ext for CPU tensors.
"""

from kernels.api import causal_attention, layer_norm, scaled_dot_product_attention
from kernels.backends import BackendUnavailable, available_backends, current_backend, use_backend
from kernels.nn import LayerNorm, patch_model

__all__ = [
    "BackendUnavailable", "LayerNorm", "available_backends", "causal_attention", "current_backend", "layer_norm",
    "patch_model", "scaled_dot_product_attention", "use_backend",
]
