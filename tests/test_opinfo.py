"""PyTorch's own sample inputs (OpInfo, as torch's test suite uses them) through every fused backend.

Each sample runs on the fused backend and in float64 through torch itself; outputs and the gradients of every input
that requires grad must agree. Error inputs must raise. Dropout samples are judged against chargpt_kernels.reference
with the mask the fused kernels specify (torch's own dropout draws a different one).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close

from conftest import FUSED_BACKENDS, require_backend

op_db = pytest.importorskip("torch.testing._internal.common_methods_invocations").op_db
OPS = {op.name: op for op in op_db}


def samples(name, dtype=torch.float32):
    if name not in OPS:
        pytest.skip(f"this torch has no OpInfo {name}")
    return list(OPS[name].sample_inputs("cpu", dtype, requires_grad=True))


def compare(fn, truth, sample_tensors, what):
    """fn(*tensors) against truth(*float64 copies): output and every gradient."""
    out = fn(*sample_tensors)
    copies = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in sample_tensors]
    expected = truth(*copies)
    assert_close(out, expected, torch.float32, f"{what}: output")
    leaves = [i for i, t in enumerate(sample_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves or out.numel() == 0:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [sample_tensors[i] for i in leaves], grad, allow_unused=True)
    want = torch.autograd.grad(expected, [copies[i] for i in leaves], grad.double(), allow_unused=True)
    for i, g, w in zip(leaves, got, want):
        assert (g is None) == (w is None), f"{what}: gradient of argument {i} is {g} but torch's is {w}"
        if g is not None:
            assert_close(g, w, torch.float32, f"{what}: gradient of argument {i}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["nn.functional.layer_norm", "native_layer_norm"])
def test_layer_norm_samples(backend, name):
    require_backend(backend, "cpu")
    for i, sample in enumerate(samples(name)):
        normalized_shape, weight, bias, eps = _layer_norm_args(name, sample)
        what = f"{backend} {name} sample {i}: input {tuple(sample.input.shape)}, eps {eps}"
        if eps <= 0:  # torch computes something for eps <= 0; the kernels refuse it (README: the contract)
            with pytest.raises(ValueError, match="eps"):
                chargpt_kernels.layer_norm(sample.input, normalized_shape, weight, bias, eps, backend=backend)
            continue
        compare(lambda x, w, b: chargpt_kernels.layer_norm(x, normalized_shape, w, b, eps, backend=backend),
                lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, eps), (sample.input, weight, bias), what)


def _layer_norm_args(name, sample):
    if name == "native_layer_norm":  # (input, normalized_shape, weight, bias, eps), all positional
        return sample.args
    normalized_shape, *rest = sample.args
    weight, bias = (list(rest) + [None, None])[:2]
    return normalized_shape, weight, bias, sample.kwargs.get("eps", 1e-5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_layer_norm_error_samples_raise(backend):
    require_backend(backend, "cpu")
    if OPS.get("native_layer_norm") is None or OPS["native_layer_norm"].error_inputs_func is None:
        pytest.skip("this torch has no error inputs for native_layer_norm")
    errors = list(OPS["native_layer_norm"].error_inputs("cpu"))
    assert errors
    for error in errors:
        sample = error.sample_input
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            chargpt_kernels.layer_norm(sample.input, *sample.args, backend=backend, **sample.kwargs)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_scaled_dot_product_attention_samples(backend):
    require_backend(backend, "cpu")
    for i, sample in enumerate(samples("nn.functional.scaled_dot_product_attention")):
        key, value = sample.args
        kwargs = dict(sample.kwargs)
        p = kwargs.get("dropout_p", 0.0)
        what = f"{backend} sdpa sample {i}: q {tuple(sample.input.shape)} k {tuple(key.shape)} {kwargs}"

        def fused(q, k, v):
            torch.manual_seed(i)
            with chargpt_kernels.use_backend(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fallback warnings are tested elsewhere
                return chargpt_kernels.scaled_dot_product_attention(q, k, v, **kwargs)

        if p == 0.0:
            compare(fused, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs),
                    (sample.input, key, value), what)
            continue
        if sample.input.dim() != key.dim():
            continue  # falls back to torch (ranks differ), whose dropout mask is torch's own: nothing to compare
        # Dropout: the fused kernels draw the keep-mask chargpt_kernels.reference specifies, from the call's first seed.
        fold = lambda t: t.reshape(-1, *t.shape[-3:]) if t.dim() > 3 else t[None]  # noqa: E731

        def truth(q, k, v):
            torch.manual_seed(i)
            seed = int(reference.new_dropout_seed(q.device))
            q4, k4 = fold(q), fold(k)
            mask = reference.dropout_keep_mask(seed, *q4.shape[:3], k4.shape[2], p).view(*q.shape[:-1], -1)
            return reference.attention(q, k, v, kwargs["is_causal"], p, kwargs.get("scale"), dropout_mask=mask)

        compare(fused, truth, (sample.input, key, value), what)


def test_linear_samples():
    """torch's F.linear samples (1-D and 5-D inputs, no rows, no in_features, with and without bias) through the
    ext GEMV: the ones of few rows run the kernel, the rest torch's GEMM behind the same entry point."""
    require_backend("ext", "cpu", ops=("linear",))
    for i, sample in enumerate(samples("nn.functional.linear")):
        weight, bias = (list(sample.args) + [None])[:2]
        compare(lambda x, w, b: chargpt_kernels.linear(x, w, b, backend="ext"), F.linear, (sample.input, weight, bias),
                f"ext nn.functional.linear sample {i}: input {tuple(sample.input.shape)}")
