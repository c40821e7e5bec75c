"""chargpt_kernels.linear: the ext CPU GEMV (csrc/cpu/linear.cpp) for the few rows of decoding against the float64
reference, on odd shapes and strided inputs, with gradients; torch's GEMM past GEMV_MAX_ROWS rows; NaN/inf, empty
inputs, bad input, the thread count, opcheck and torch.compile; and the GPT decoding through it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from chargpt_kernels import backends, reference
from chargpt_kernels.testing import assert_close, check_against_reference

from conftest import require_backend

FP32 = torch.float32


@pytest.fixture(scope="module")
def ext_linear():
    require_backend("ext", "cpu", ops=("linear",))
    from chargpt_kernels import ext_linear

    return ext_linear


def linear_inputs(lead, k, n, bias, seed, requires_grad=True):
    """Fresh random x (*lead, k), weight (n, k) at nn.Linear's scale and bias (n,) (None when not asked for)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if bias else None
    return tuple(None if t is None else t.requires_grad_(requires_grad) for t in (x, w, b))


def fused_linear(x, w, b):
    return chargpt_kernels.linear(x, w, b, backend="ext")


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("k,n", [(1, 7), (7, 1), (40, 33), (59, 65), (80, 5), (384, 1152), (1000, 13)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_gemv_matches_float64(ext_linear, rows, k, n, bias):
    """The GEMV rows (every x-row remainder of 4, every weight-row remainder of 4, K with and without a vector tail),
    output and the gradients of x, weight and bias."""
    inputs = linear_inputs((rows,), k, n, bias, seed=rows * 1000 + k + n)
    calls = count_op_calls(lambda: check_against_reference(fused_linear, reference.linear, inputs, FP32,
                                                           f"linear {rows}x{k} -> {n}"))
    assert calls == 1  # the GEMV ran, not torch's GEMM


@pytest.mark.parametrize("lead", [(9,), (2, 33)], ids=["9-rows", "66-rows"])
def test_many_rows_take_torchs_gemm(ext_linear, lead):
    """Past GEMV_MAX_ROWS rows the call is torch's GEMM (the GEMV's kernel is not called), with the same result."""
    assert lead[-1] * (lead[0] if len(lead) > 1 else 1) > ext_linear.GEMV_MAX_ROWS
    inputs = linear_inputs(lead, 59, 40, True, seed=3)
    assert count_op_calls(lambda: check_against_reference(fused_linear, reference.linear, inputs, FP32, "rows")) == 0


def count_op_calls(fn):
    """How many times fn calls chargpt::linear_fwd's CPU kernel (through torch's profiler: no patching of the op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "chargpt::linear_fwd")


def test_strided_and_folded_inputs(ext_linear):
    """x as a row-strided slice and as a column-strided view, weight transposed in memory, a 3-D input (leading
    dims folded into rows) and a 1-D one, as F.linear takes them."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 2 * 80, generator=gen)
    w_t = (torch.randn(80, 33, generator=gen) / 9).requires_grad_()
    b = torch.randn(33, generator=gen)
    for x in (wide[:, :80], wide[:, ::2], wide[:2, :80].reshape(1, 2, 80), wide[0, :80]):
        x = x.detach().requires_grad_()
        check_against_reference(lambda x, w: fused_linear(x, w, b), lambda x, w: reference.linear(x, w, b.double()),
                                (x, w_t.t()), FP32, f"linear x {tuple(x.shape)} stride {x.stride()}")


def test_nan_and_inf_follow_torch(ext_linear):
    """A NaN or inf in x spreads to its row as in torch: NaN from a NaN, and from inf times a zero weight; inf, or
    NaN where the inf terms of a sum differ in sign."""
    x, w, b = linear_inputs((3,), 59, 20, True, seed=6, requires_grad=False)
    x[0, 7], x[1, 58] = float("nan"), float("inf")
    w[4, 58] = 0.0
    got, want = fused_linear(x, w, b), F.linear(x, w, b)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert_close(got, reference.linear(x.double(), w.double(), b.double()), FP32, "finite entries")


@pytest.mark.parametrize("shape", [(0, 8, 5), (2, 8, 0), (2, 0, 5)], ids=["no-rows", "no-outputs", "no-inputs"])
def test_empty_inputs_give_torchs_result(ext_linear, shape):
    m, k, n = shape
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    got = fused_linear(x, w, b)
    assert torch.equal(got, F.linear(x, w, b))  # K = 0: the bias alone
    assert torch.equal(torch.ops.chargpt.linear_fwd(x, w, None), F.linear(x, w))


def test_bad_input_raises_clear_errors(ext_linear):
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="do not fit"):
        chargpt_kernels.linear(x, torch.randn(5, 7))
    with pytest.raises(ValueError, match="do not fit"):
        chargpt_kernels.linear(x, torch.randn(8))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        chargpt_kernels.linear(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="weight is torch.float64"):
        chargpt_kernels.linear(x, w.double())
    with pytest.raises(TypeError, match="floating-point"):
        chargpt_kernels.linear(x.long(), w)
    # The raw op checks too, and names the dtype its CPU kernel takes.
    with pytest.raises(RuntimeError, match="takes float32"):
        torch.ops.chargpt.linear_fwd(x.double(), w.double(), None)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.chargpt.linear_fwd(x, torch.randn(5, 7), None)


def test_backend_choice():
    """auto runs linear on ext for float32 CPU tensors (where ext loads) and on eager otherwise; triton, which has no
    linear kernel, is passed by under auto and refused when named."""
    if backends.unavailable_reason("ext") is None:
        assert backends.backend_for("auto", "linear", "cpu", FP32) == "ext"
    assert backends.backend_for("auto", "linear", "cpu", torch.bfloat16) == "eager"
    if backends.unavailable_reason("triton") is None:
        with pytest.raises(TypeError, match="has no linear kernel"):
            backends.backend_for("triton", "linear", "cpu", FP32)


def test_double_backward(ext_linear):
    """The backward is torch ops, so second derivatives come out as torch's."""
    x, w, b = linear_inputs((2,), 40, 7, True, seed=7)
    grads = {}
    for name, fn in (("ext", fused_linear), ("torch", F.linear)):
        y = fn(x, w, b)
        gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grads[name] = torch.autograd.grad(gx.square().sum(), (x, w))
    for got, want in zip(grads["ext"], grads["torch"]):
        assert_close(got, want, FP32, "second derivative")


def test_results_do_not_depend_on_the_thread_count(ext_linear):
    """Weight rows are split among threads, but each output is summed by one thread in a fixed order."""
    x, w, b = linear_inputs((5,), 384, 1536, True, seed=8, requires_grad=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_linear(x, w, b)
        torch.set_num_threads(2)
        two = fused_linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_opcheck_and_compile(ext_linear):
    x, w, b = linear_inputs((3,), 59, 33, True, seed=9)
    torch.library.opcheck(torch.ops.chargpt.linear_fwd.default, (x, w, b))
    torch.library.opcheck(torch.ops.chargpt.linear_fwd.default, (x[:1], w, None))
    compiled = torch.compile(fused_linear, fullgraph=True)
    assert_close(compiled(x, w, b), reference.linear(x.double(), w.double(), b.double()), FP32, "compiled")


def test_gpt_decodes_through_the_gemv(ext_linear):
    """A GPT on ext decodes with the GEMV (every linear layer of a decoding step calls it) and picks eager's greedy
    tokens; training batches keep torch's GEMM."""
    from chargpt.model import ModelConfig, build_model

    config = ModelConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=48)
    torch.manual_seed(0)
    eager = build_model(config).eval()
    fused = build_model(dataclasses.replace(config, kernels="ext")).eval()
    fused.load_state_dict(eager.state_dict())
    prompt = torch.randint(65, (1, 20), generator=torch.Generator().manual_seed(1))
    steps = 10
    tokens = {}
    calls = count_op_calls(lambda: tokens.update(ext=fused.generate(prompt, steps + 1, temperature=0)))
    # Per decoding step: c_attn, attention's c_proj, c_fc and the MLP's c_proj of each layer, and lm_head; the prefill
    # (20 rows) takes torch's GEMM but for its lm_head, which sees the last row only.
    assert calls == steps * (4 * config.n_layer + 1) + 1
    assert torch.equal(tokens["ext"], eager.generate(prompt, steps + 1, temperature=0))
    x = torch.randint(65, (4, 64))
    assert count_op_calls(lambda: fused.train()(x, x)[1].backward()) == 0
