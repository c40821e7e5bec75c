"""chargpt kernels: fused causal attention and LayerNorm for any PyTorch model.

    import chargpt_kernels
    y = chargpt_kernels.layer_norm(x, (C,), weight, bias)             # F.layer_norm-compatible
    o = chargpt_kernels.scaled_dot_product_attention(q, k, v, is_causal=True)  # F.sdpa-compatible
    y = chargpt_kernels.rms_norm(x, (C,), weight)                    # F.rms_norm-compatible
    y, h = chargpt_kernels.add_norm(x, residual, (C,), weight, bias)   # h = residual + dropout(x), y = norm(h)
    y = chargpt_kernels.linear(x, weight, bias)                      # F.linear-compatible (a CPU GEMV for decoding)
    chargpt_kernels.patch_model(model)                               # nn.LayerNorm / nn.RMSNorm -> the kernels drop-ins

Backends: eager (chargpt_kernels.reference, the ground truth), triton (kernels/chargpt_kernels/triton_*.py), ext (csrc/,
a C++/CUDA extension). `auto` (the default) picks triton for CUDA tensors and ext for CPU tensors.
"""

from chargpt_kernels.api import add_norm, causal_attention, layer_norm, linear, rms_norm, scaled_dot_product_attention
from chargpt_kernels.backends import available_backends, current_backend, use_backend
from chargpt_kernels.nn import LayerNorm, RMSNorm, patch_model
from chargpt_kernels.runtime import BackendUnavailable

__all__ = [
    "BackendUnavailable", "LayerNorm", "RMSNorm", "add_norm", "available_backends", "causal_attention",
    "current_backend", "layer_norm", "linear", "patch_model", "rms_norm", "scaled_dot_product_attention", "use_backend",
]
