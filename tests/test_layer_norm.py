"""Every fused LayerNorm backend against the float64 eager reference, forward and backward, plus the drop-ins."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import reference
from chargpt_kernels.testing import check_against_reference, layer_norm_inputs

from chargpt_helpers import checkout_env
from conftest import FUSED_BACKENDS, assert_close, device_dtype_params, require_backend

AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("weight,bias", AFFINE, ids=["wb", "w", "b", "none"])
@pytest.mark.parametrize("n", [1, 7, 384, 1000, 4099])
def test_matches_reference(backend, device, dtype, weight, bias, n):
    require_backend(backend, device, dtype, ops=("layer_norm",))
    x, w, b = layer_norm_inputs((3, 5), n, device, dtype, weight, bias, seed=n, contiguous=(n % 2 == 0))
    with chargpt_kernels.use_backend(backend):
        y = check_against_reference(lambda x, w, b: chargpt_kernels.layer_norm(x, (n,), w, b, eps=1e-5),
                                    lambda x, w, b: reference.layer_norm(x, w, b, eps=1e-5), (x, w, b), dtype,
                                    f"{backend} n={n}")
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_multi_dim_normalized_shape_and_many_rows(backend):
    require_backend(backend, "cpu")
    x = torch.randn(300, 4, 6, dtype=torch.float32, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    y = chargpt_kernels.layer_norm(x, (4, 6), w, None, 1e-3, backend=backend)
    y.sum().backward()
    want = F.layer_norm(x.double(), (4, 6), w.double(), None, 1e-3)
    assert_close(y, want, torch.float32, f"{backend} (4, 6)")
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_matches_torch_layer_norm(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    require_backend(backend, "cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, w, b = layer_norm_inputs((16384,), 384, "cuda", dtype, True, True, seed=1)
        y = chargpt_kernels.layer_norm(x, (384,), w, b, backend=backend)
        assert_close(y, F.layer_norm(x.double(), (384,), w.double(), b.double()), dtype, f"{backend} vs F")


def test_layer_norm_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = nn.LayerNorm(24)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = chargpt_kernels.LayerNorm(24)
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 24)
    torch.testing.assert_close(fused(x), ref(x))
    no_bias = chargpt_kernels.LayerNorm(24, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]


def test_patch_model_swaps_every_layer_norm_and_keeps_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Sequential(nn.GELU(), nn.LayerNorm(16)))
    for ln in (model[1], model[2][1]):
        nn.init.normal_(ln.weight)
    x = torch.randn(4, 8)
    before = model(x)
    params = [p for p in model.parameters()]
    chargpt_kernels.patch_model(model, backend="eager")
    assert isinstance(model[1], chargpt_kernels.LayerNorm) and isinstance(model[2][1], chargpt_kernels.LayerNorm)
    assert [p for p in model.parameters()] == params  # the same objects, so an existing optimizer keeps working
    torch.testing.assert_close(model(x), before)
    with pytest.raises(TypeError, match="contains"):
        chargpt_kernels.patch_model(nn.LayerNorm(4))


@pytest.mark.parametrize("backend", ("eager",) + FUSED_BACKENDS)
def test_bad_input_raises_with_a_message(backend):
    require_backend(backend, "cpu")
    x = torch.randn(4, 8)
    cases = [
        ((x, (7,)), ValueError, "normalized_shape"),
        ((x, (8,), torch.randn(7)), ValueError, "weight"),
        ((x.long(), (8,)), TypeError, "floating-point"),
        ((x, (8,), torch.randn(8).double()), TypeError, "float64"),
        ((x, (8,), torch.randn(8, device="meta")), ValueError, "meta"),
        ((x, (8,), None, None, 0.0), ValueError, "eps"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            chargpt_kernels.layer_norm(*args, backend=backend)


def test_backend_selection_errors_are_clear():
    with pytest.raises(ValueError, match="unknown chargpt_kernels backend"):
        with chargpt_kernels.use_backend("fast"):
            pass
    assert "eager" in chargpt_kernels.available_backends()
    # Triton asked for a CPU tensor without the interpreter: a fresh process, since this one set TRITON_INTERPRET.
    env = checkout_env({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, CUDA_VISIBLE_DEVICES="")
    code = "import torch, chargpt_kernels; chargpt_kernels.layer_norm(torch.randn(2, 4), (4,), backend='triton')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "TRITON_INTERPRET" in run.stderr.splitlines()[-1], run.stderr
