"""The norm family beyond LayerNorm: rms_norm, and add_norm (residual + dropout + norm) against what a model runs
without it (x + residual, then F.dropout, then F.layer_norm / F.rms_norm), forward and forward+backward.

Bytes per call count the compulsory traffic (each (M, N) tensor read or written once); a plain copy of x in the same
run (backend "copy", forward only) says what this machine streams, so GB/s can be read against it."""

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from bench.common import DEVICE, checks_weight_grads, compiled, skip_unless_runnable
from chargpt_kernels import reference
from chargpt_kernels.testing import check_against_reference, layer_norm_inputs

if DEVICE == "cuda":
    SHAPES = [(16384, 384, torch.bfloat16), (4096, 4096, torch.bfloat16)]
    BACKENDS = ("torch", "torch.compile", "triton", "ext")
else:  # bf16: the ext kernels (float32 math in scratch) against torch's own bf16 CPU ops
    SHAPES = [(16384, 384, torch.float32), (16384, 384, torch.bfloat16)]
    BACKENDS = ("torch", "eager", "ext")
# (op, norm, dropout_p): rms_norm alone, and add_norm in the two flavours today's models use.
OPS = [("rms_norm", "rms", 0.0), ("add_norm", "layer", 0.2), ("add_norm", "rms", 0.0)]
# eager is torch's composed math in the input dtype: held to the float64 reference (and timed) in float32 only.
CASES = [(op, shape, backend) for op in OPS for shape in SHAPES for backend in ("copy",) + BACKENDS
         if backend != "eager" or shape[2] == torch.float32]
CHECKED_ROWS = 1024
PASSES = {"rms_norm": (2, 5), "add_norm": (4, 9)}  # (M, N) tensors moved: forward, forward+backward


def norm_fn(op, norm, p, backend):
    """fn(x, residual, weight, bias) -> a tensor (add_norm: y and h side by side) for `backend`."""
    if op == "rms_norm":
        if backend == "torch":
            return lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w)
        if backend == "torch.compile":
            return lambda x, r, w, b: compiled(reference.rms_norm)(x, w)
        return lambda x, r, w, b: chargpt_kernels.rms_norm(x, x.shape[-1:], w, backend=backend)

    def unfused(x, r, w, b):
        h = r + F.dropout(x, p)
        y = F.layer_norm(h, h.shape[-1:], w, b) if norm == "layer" else F.rms_norm(h, h.shape[-1:], w)
        return torch.cat([y, h], -1)

    if backend == "torch":
        return unfused
    if backend == "torch.compile":
        return compiled(unfused)
    return lambda x, r, w, b: torch.cat(chargpt_kernels.add_norm(x, r, x.shape[-1:], w, b, 1e-5, norm, p,
                                                                 backend=backend), -1)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op,shape,backend", CASES,
                         ids=[f"{o[0]}-{o[1]}-p{o[2]}-{m}x{n}-{str(dt)[6:]}-{b}" for o, (m, n, dt), b in CASES])
def test_norms(timed, op, shape, backend, mode):
    (name, norm, p), (rows, n, dtype) = op, shape
    if backend == "copy":
        if mode != "fwd":
            pytest.skip("the copy rate is a forward-only reference line")
    else:
        skip_unless_runnable(backend)
    if backend not in ("copy", "torch", "torch.compile", "eager"):
        try:
            chargpt_kernels.backends.backend_for(backend, name, DEVICE, dtype)
        except TypeError as lacking:
            pytest.skip(str(lacking))
    x, w, b = layer_norm_inputs((rows,), n, DEVICE, dtype, True, norm == "layer", seed=0, requires_grad=mode != "fwd")
    residual = layer_norm_inputs((rows,), n, DEVICE, dtype, False, False, seed=1,
                                 requires_grad=mode != "fwd")[0] if name == "add_norm" else None
    info = dict(op=f"{name} ({norm}{f', dropout {p}' if p else ''})", mode=mode, shape=f"{rows}x{n}",
                dtype=str(dtype).removeprefix("torch."))
    key = f"{info['op']} {mode} {info['shape']} {info['dtype']}"
    if backend == "copy":
        out = torch.empty_like(x)
        timed(lambda: out.copy_(x), key, "copy", info, {"bytes": 2 * x.numel() * x.element_size()},
              lambda: torch.testing.assert_close(out.copy_(x), x))
        return
    fn = norm_fn(name, norm, p, backend)
    inputs = (x, residual, w, b)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    grad = torch.randn(rows, n * (2 if name == "add_norm" else 1), device=DEVICE, dtype=dtype)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        def step():
            torch.autograd.grad(fn(*inputs), leaves, grad)

    def check():
        # torch, torch.compile and eager draw dropout masks of their own: their math is checked at p = 0.
        checked_p = p if backend in ("triton", "ext") else 0.0
        checked = norm_fn(name, norm, checked_p, backend)

        def expected(x, r, w, b):
            if name == "rms_norm":
                return reference.rms_norm(x, w)
            mask = None
            if checked_p:
                seed = int(reference.new_dropout_seed(x.device))
                mask = reference.dropout_keep_mask(seed, 1, 1, len(x), n, checked_p, x.device).view(len(x), n)
            return torch.cat(reference.add_norm(x, r, w, b, 1e-5, norm, checked_p, dropout_mask=mask), -1)

        # The first CHECKED_ROWS rows: the same kernels run, and their dropout offsets (row * N + col) are the same.
        head = tuple(t[:CHECKED_ROWS] if t is not None and t.dim() == 2 else t for t in inputs)
        if norm == "layer" and not checks_weight_grads(backend, dtype):  # see checks_weight_grads
            head = head[:2] + tuple(t if t is None else t.detach() for t in head[2:])
        check_against_reference(checked, expected, head, dtype, key + f" {backend}", backward=mode != "fwd")

    moved = rows * n * x.element_size() * PASSES[name][mode != "fwd"]
    timed(step, key, backend, info, {"bytes": moved}, check)
