"""How kernels are judged, shared by the tests and the benchmarks (which validate before they time).

    inputs = chargpt_kernels.testing.attention_inputs(2, 3, 113, 113, 40, "cpu", torch.float32, seed=0)
    chargpt_kernels.testing.check_against_reference(my_attention, chargpt_kernels.reference.attention, inputs,
                                                    torch.float32)

The truth is the eager reference evaluated in float64 on the same values; tolerances depend on the dtype under
test only. Inputs are fresh random numbers (never zeros) in the layouts real models hand over.
"""

from typing import Callable, Optional, Sequence

import torch

# (rtol, atol) against the float64 reference, by input dtype. atol scales with the reference's largest magnitude.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Assert a kernel result matches the float64 reference; the message gives max abs and relative error.

    atol is relative to the reference's largest magnitude, so sums over many rows (dW, dB) get a fair bound.
    NaN must sit where the reference has NaN (and nowhere else)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, atol = TOLERANCE[dtype]
    actual, expected = actual.double(), expected.double()
    finite = expected[expected.isfinite()]
    atol *= max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    err = (actual - expected).abs().nan_to_num(0.0)
    worst = err.max().item() if err.numel() else 0.0
    rel = (err / expected.abs().clamp_min(1e-6)).nan_to_num(0.0).max().item() if err.numel() else 0.0
    ok = torch.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    assert ok, f"{what}: max abs err {worst:.3g}, max rel err {rel:.3g} (rtol {rtol}, atol {atol:.3g})"


def attention_inputs(b: int, h: int, tq: int, tk: int, d: int, device, dtype: torch.dtype, seed: int,
                     requires_grad: bool = True, h_kv: Optional[int] = None) -> tuple:
    """Fresh random q (B, H, Tq, D), k and v (B, H_kv, Tk, D) as nanoGPT makes them: (B, T, H, D) storage viewed
    as (B, H, T, D), so none of them is contiguous."""
    gen = torch.Generator().manual_seed(seed)
    h_kv = h if h_kv is None else h_kv
    q = torch.randn(b, tq, h, d, generator=gen).transpose(1, 2)
    kv = torch.randn(b, tk, 2, h_kv, d, generator=gen).permute(2, 0, 3, 1, 4)
    to = lambda t: t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return to(q), to(kv[0]), to(kv[1])


def layer_norm_inputs(lead: Sequence[int], n: int, device, dtype: torch.dtype, weight: bool, bias: bool, seed: int,
                      contiguous: bool = True, requires_grad: bool = True) -> tuple:
    """Fresh random x (*lead, n) with a non-zero mean and spread (so centring and scaling are both exercised), and
    weight and bias (n,) around 1 (None when not asked for). contiguous=False gives x as a strided slice of a wider
    activation."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=gen) * 2.0 + 0.5
    if not contiguous:
        x = torch.randn(*lead, 2 * n, generator=gen)[..., ::2] * 2.0 + 0.5
    make = lambda on: (torch.randn(n, generator=gen) + 1.0) if on else None  # noqa: E731
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return to(x), to(make(weight)), to(make(bias))


def check_against_reference(fn: Callable, reference_fn: Callable, inputs: Sequence[Optional[torch.Tensor]],
                            dtype: torch.dtype, what: str, backward: bool = True, seed: int = 0) -> torch.Tensor:
    """Run fn(*inputs) and reference_fn on float64 copies of the inputs; assert the outputs (and, with `backward`,
    the gradients of every input that requires grad, under one random upstream gradient) agree. Returns fn's output.

    torch's RNG is seeded with `seed` before each of the two calls, so a reference that draws the kernels' dropout
    seed (chargpt_kernels.reference.new_dropout_seed) as its first random number sees the same mask."""
    torch.manual_seed(seed)
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    torch.manual_seed(seed)
    expected = reference_fn(*inputs64)
    assert_close(out, expected, dtype, f"{what}: output")
    if backward and leaves:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
        grads = torch.autograd.grad(out, leaves, grad)
        leaves64 = [t for t in inputs64 if t is not None and t.requires_grad]
        expected_grads = torch.autograd.grad(expected, leaves64, grad.double())
        for i, (actual_grad, expected_grad) in enumerate(zip(grads, expected_grads)):
            assert_close(actual_grad, expected_grad, dtype, f"{what}: gradient of input {i}")
    return out
