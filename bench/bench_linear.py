"""linear for the few rows of decoding: one call multiplies `rows` rows by every weight matrix of the gpt preset's
model (6 layers of c_attn, c_proj, c_fc and the MLP's c_proj: 42 MB of float32, more than a CPU's L3 usually holds),
as one decoding step does, with torch's F.linear and with chargpt_kernels.linear (ext: the multi-threaded GEMV).

Bytes per call are the weights' (each read once; x and y are a few KB); a plain read of the same weights in the same
run (backend "read": their sum) says what this machine streams, so GB/s can be read against it."""

import functools

import pytest
import torch
import torch.nn.functional as F

import chargpt_kernels
from bench.common import DEVICE, skip_unless_runnable
from chargpt_kernels import reference
from chargpt_kernels.testing import assert_close

N_EMBD, N_LAYER = 384, 6
SHAPES = [(3 * N_EMBD, N_EMBD), (N_EMBD, N_EMBD), (4 * N_EMBD, N_EMBD), (N_EMBD, 4 * N_EMBD)]  # (out, in) a layer
ROWS = (1, 4, 8)
BACKENDS = ("read", "torch", "ext") if DEVICE == "cpu" else ("torch",)  # the GEMV kernel is ext's, on CPU


@functools.cache
def weights():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE) for _ in range(N_LAYER) for n, k in SHAPES]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear(timed, backend, rows):
    if backend not in ("read", "torch"):
        skip_unless_runnable(backend)
    ws = weights()
    gen = torch.Generator().manual_seed(rows)
    xs = {k: torch.randn(rows, k, generator=gen).to(DEVICE) for k in {k for _, k in SHAPES}}
    fn = F.linear if backend == "torch" else functools.partial(chargpt_kernels.linear, backend=backend)

    def step():
        if backend == "read":
            return [w.sum() for w in ws]
        return [fn(xs[w.shape[1]], w) for w in ws]

    def check():
        if backend == "read":
            return
        for w, y in zip(ws[:len(SHAPES)], step()):
            assert_close(y, reference.linear(xs[w.shape[1]].double(), w.double()), torch.float32,
                         f"linear {rows}x{w.shape[1]} -> {w.shape[0]} {backend}")

    info = dict(op="linear", mode="fwd", shape=f"{rows} rows x gpt weights", dtype="float32")
    with torch.no_grad():
        timed(step, f"linear {info['shape']}", backend, info,
              {"bytes": sum(w.numel() * w.element_size() for w in ws)}, check)
