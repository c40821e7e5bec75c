"""Shared test set-up. Without a GPU, Triton runs through its interpreter: the variable must be set before
anything imports triton, which is why it lives here, at the top of the first file pytest loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from chargpt_kernels import backends  # noqa: E402
from chargpt_kernels.backends import unavailable_reason  # noqa: E402
from chargpt_kernels.testing import TOLERANCE, assert_close  # noqa: E402, F401 (re-exported to the test modules)

FUSED_BACKENDS = ("triton", "ext")


def device_dtype_params():
    """(device, dtype) pairs to test: float32 (and float16 / bfloat16 where a backend takes them) on CPU, and
    float32/16/bf16 on CUDA when there is one."""
    params = [pytest.param("cpu", torch.float32, id="cpu-fp32"), pytest.param("cpu", torch.float16, id="cpu-fp16"),
              pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
    if torch.cuda.is_available():
        params += [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}")
                   for dt in (torch.float32, torch.float16, torch.bfloat16)]
    return params


def require_backend(name, device, dtype=torch.float32, ops=("layer_norm", "attention")):
    """Skip unless backend `name` runs `ops` on `dtype` tensors of `device` here."""
    reason = unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")
    if name == "triton" and device == "cpu" and torch.cuda.is_available():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1, which this CUDA run does not set")
    for op in ops:
        try:
            backends.backend_for(name, op, device, dtype)
        except TypeError as unsupported:
            pytest.skip(str(unsupported))


def require_attention_features(name, device, dtype, needs):
    """Skip unless backend `name` fuses attention with the optional features `needs` ("mask", "gqa") here."""
    require_backend(name, device, dtype, ops=("attention",))
    try:
        backends.backend_for(name, "attention", device, dtype, tuple(needs))
    except TypeError as lacking:
        pytest.skip(str(lacking))
