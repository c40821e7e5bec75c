"""The norm family beyond LayerNorm: rms_norm and add_norm (residual + dropout + norm) on every backend, against the
float64 reference, plus the RMSNorm drop-in and patch_model over mixed norms."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import check_against_reference, layer_norm_inputs

from conftest import FUSED_BACKENDS, assert_close, device_dtype_params, require_backend

BACKENDS = ("eager",) + FUSED_BACKENDS
N_ODD = [1, 7, 384, 1000, 4099]


def require(backend, device, dtype, op):
    if backend == "eager" and dtype != torch.float32:
        pytest.skip("eager is torch's composed math; it is held to the reference in float32 only")
    require_backend(backend, device, dtype, ops=(op,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("weight", [True, False], ids=["w", "none"])
@pytest.mark.parametrize("n", N_ODD)
def test_rms_norm_matches_reference(backend, device, dtype, weight, n):
    require(backend, device, dtype, "rms_norm")
    x, w, _ = layer_norm_inputs((3, 5), n, device, dtype, weight, False, seed=n, contiguous=(n % 2 == 0))
    eps = 1e-6
    y = check_against_reference(lambda x, w: chargpt_kernels.rms_norm(x, (n,), w, eps, backend=backend),
                                lambda x, w: reference.rms_norm(x, w, eps), (x, w), dtype, f"{backend} rms n={n}")
    assert y.dtype == dtype and y.shape == x.shape


def test_rms_norm_reference_is_torchs():
    x, w, _ = layer_norm_inputs((4,), 33, "cpu", torch.float64, True, False, seed=0, requires_grad=False)
    torch.testing.assert_close(reference.rms_norm(x, w), F.rms_norm(x, (33,), w))
    torch.testing.assert_close(reference.rms_norm(x, None, 1e-3), F.rms_norm(x, (33,), None, 1e-3))


def add_norm_case(backend, device, dtype, n, norm, weight, bias, dropout_p, seed):
    """(fused inputs, fused fn, reference fn) for add_norm, the reference drawing the mask the kernels specify."""
    x, w, b = layer_norm_inputs((2, 3), n, device, dtype, weight, bias, seed=seed, contiguous=(n % 2 == 1))
    residual = layer_norm_inputs((2, 3), n, device, dtype, False, False, seed=seed + 1)[0]
    eps = 1e-5

    def fused(x, residual, w, b):
        y, h = chargpt_kernels.add_norm(x, residual, (n,), w, b, eps, norm, dropout_p, backend=backend)
        return torch.cat([y, h], dim=-1)  # one output, so check_against_reference sees gradients through both

    def expected(x, residual, w, b):
        mask = None
        if dropout_p > 0.0:
            seed_tensor = reference.new_dropout_seed(x.device)
            mask = reference.dropout_keep_mask(int(seed_tensor), 1, 1, x[..., 0].numel(), n, dropout_p).view(x.shape)
        y, h = reference.add_norm(x, residual, w, b, eps, norm, dropout_p, dropout_mask=mask)
        return torch.cat([y, h], dim=-1)

    return (x, residual, w, b), fused, expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("norm,weight,bias", [("layer", True, True), ("layer", True, False), ("layer", False, False),
                                              ("rms", True, False), ("rms", False, False)],
                         ids=["layer-wb", "layer-w", "layer-none", "rms-w", "rms-none"])
@pytest.mark.parametrize("n", N_ODD)
def test_add_norm_matches_reference(backend, device, dtype, norm, weight, bias, n):
    require(backend, device, dtype, "add_norm")
    inputs, fused, expected = add_norm_case(backend, device, dtype, n, norm, weight, bias, 0.0, seed=n)
    check_against_reference(fused, expected, inputs, dtype, f"{backend} add_norm {norm} n={n}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("n", [7, 384, 1000])
def test_add_norm_dropout_uses_the_specified_mask(backend, norm, n):
    """Outputs and gradients equal the reference's under the spec mask: the backward regenerates the same mask."""
    require_backend(backend, "cpu", ops=("add_norm",))
    inputs, fused, expected = add_norm_case(backend, "cpu", torch.float32, n, norm, True, norm == "layer", 0.3, 7)
    check_against_reference(fused, expected, inputs, torch.float32, f"{backend} add_norm dropout {norm}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_dropout_statistics(backend):
    """About p of x is dropped, the kept part is scaled by 1/(1-p), the same seed repeats the mask, another does not."""
    require_backend(backend, "cpu", ops=("add_norm",))
    x = torch.randn(256, 384) + 3.0
    residual = torch.zeros(256, 384)

    def h(seed):
        torch.manual_seed(seed)
        return chargpt_kernels.add_norm(x, residual, (384,), dropout_p=0.2, backend=backend)[1]

    first = h(1)
    kept = first != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.01
    torch.testing.assert_close(first[kept], x[kept] / 0.8)
    assert torch.equal(first, h(1)) and not torch.equal(first, h(2))


def test_add_norm_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="norm must be"):
        chargpt_kernels.add_norm(x, x, (8,), norm="batch")
    with pytest.raises(ValueError, match="residual has shape"):
        chargpt_kernels.add_norm(x, x[:2], (8,))
    with pytest.raises(ValueError, match="no bias"):
        chargpt_kernels.add_norm(x, x, (8,), torch.ones(8), torch.ones(8), norm="rms")
    with pytest.raises(ValueError, match="dropout_p"):
        chargpt_kernels.add_norm(x, x, (8,), dropout_p=1.0)
    with pytest.raises(TypeError, match="float64"):
        chargpt_kernels.add_norm(x, x.double(), (8,))
    with pytest.raises(ValueError, match="normalized_shape"):
        chargpt_kernels.add_norm(x, x, (9,))
    with pytest.raises(ValueError, match="eps"):
        chargpt_kernels.rms_norm(x, (8,), eps=-1.0)


def test_rms_norm_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    fused = chargpt_kernels.RMSNorm(24, eps=1e-6)
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["weight"]
    x = torch.randn(5, 24)
    torch.testing.assert_close(fused(x), ref(x))
    assert chargpt_kernels.RMSNorm(24, elementwise_affine=False).weight is None


class LlamaStyleRMSNorm(nn.Module):
    """A model's own RMSNorm, as the Llama family writes it (weight, variance_epsilon)."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_patch_model_swaps_mixed_norms_and_a_models_own_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Sequential(nn.GELU(), nn.RMSNorm(16, eps=1e-5)),
                          LlamaStyleRMSNorm(16))
    for norm in (model[1], model[2][1]):
        nn.init.normal_(norm.weight)
    x = torch.randn(4, 8)
    before = model(x)
    params = list(model.parameters())
    chargpt_kernels.patch_model(model, backend="eager", norms={LlamaStyleRMSNorm: "rms"})
    assert isinstance(model[1], chargpt_kernels.LayerNorm) and isinstance(model[2][1], chargpt_kernels.RMSNorm)
    assert isinstance(model[3], chargpt_kernels.RMSNorm) and model[3].eps == 1e-6
    assert [p for p in model.parameters()] == params  # the same objects: optimizers stay valid
    assert_close(model(x), before.double(), torch.float32, "patched model")
    with pytest.raises(TypeError, match="not the norm itself"):
        chargpt_kernels.patch_model(nn.RMSNorm(4))
