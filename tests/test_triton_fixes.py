"""Regression tests for the Triton modules' edge cases, each one seen failing before its fix.

They call kernels.triton_layer_norm / kernels.triton_attention directly (not the public API, which may route edge
cases elsewhere), on CPU under the interpreter or on CUDA, against the float64 reference or torch.
"""

import pytest
import torch

from kernels import reference
from kernels.backends import unavailable_reason
from kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None, reason=f"triton: {unavailable_reason('triton')}")


def _grads(fn, inputs, grad=None):
    """fn(*inputs) and the gradients of every input (fresh leaves), under `grad` (default: seeded randn)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return (out, *torch.autograd.grad(out, leaves, grad)), grad


# --- LayerNorm: weight and bias are read through their strides ---------------------------------------------------

@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("n", [40, 4099], ids=["one-block", "swept"])
def test_layer_norm_weight_and_bias_views(n, layout):
    """A slice w[::2] or an expanded scalar as weight/bias: read through its strides; dw, db get its shape."""
    from kernels import triton_layer_norm

    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(3, n, generator=gen) * 2 + 0.5).to(DEVICE)
    if layout == "strided":
        w, b = torch.randn(2 * n, generator=gen)[::2], torch.randn(3 * n, generator=gen)[::3]
    else:
        w, b = torch.randn(1, generator=gen).expand(n), torch.randn(1, generator=gen).expand(n)
    w, b = w.to(DEVICE), b.to(DEVICE)
    got, grad = _grads(lambda x, w, b: triton_layer_norm.layer_norm(x, w, b, 1e-5), (x, w, b))
    want, _ = _grads(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), (x.double(), w.double(), b.double()),
                     grad.double())
    for what, a, e in zip(("y", "dx", "dw", "db"), got, want):
        assert_close(a, e, torch.float32, f"{layout} weight/bias {what} (n={n})")
