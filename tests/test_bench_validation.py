"""The benchmarks validate before they time: a wrong answer must stop a row before it reports a speed-up."""

import pytest
import torch

import chargpt_kernels
from bench import bench_attention, bench_layer_norm
from chargpt_kernels import reference
from chargpt_kernels.testing import attention_inputs, check_against_reference, layer_norm_inputs


def test_attention_validation_rejects_a_wrong_output_and_a_wrong_dropout_mask():
    q, k, v = attention_inputs(2, 2, 40, 40, 16, "cpu", torch.float32, seed=0)
    right = bench_attention.attention_fn("eager")
    bench_attention.validation("eager", right, q, k, v, 0.2, backward=True)()  # eager is checked at p = 0
    with pytest.raises(AssertionError, match="output"):
        bench_attention.validation("eager", lambda *a: right(*a) * 1.001, q, k, v, 0.0, backward=False)()
    if "ext" in chargpt_kernels.available_backends():  # a fused backend is checked with its dropout mask
        ext = bench_attention.attention_fn("ext")
        bench_attention.validation("ext", ext, q, k, v, 0.2, backward=True)()
        with pytest.raises(AssertionError, match="output"):
            bench_attention.validation("ext", lambda q, k, v, p: ext(q, k, v, 0.0), q, k, v, 0.2, backward=False)()


def test_layer_norm_validation_rejects_a_wrong_gradient():
    x, w, b = layer_norm_inputs((5,), 24, "cpu", torch.float32, True, True, seed=1)
    norm = bench_layer_norm.layer_norm_fn("torch")

    class WrongBackward(torch.autograd.Function):  # right forward, gradient 10% off
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.1

    check_against_reference(norm, reference.layer_norm, (x, w, b), torch.float32, "torch")
    with pytest.raises(AssertionError, match="gradient of input 0"):
        check_against_reference(lambda x, w, b: norm(WrongBackward.apply(x), w, b), reference.layer_norm, (x, w, b),
                                torch.float32, "wrong dx")
