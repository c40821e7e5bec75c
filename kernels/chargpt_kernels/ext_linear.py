"""linear on the `ext` backend: the chargpt C++ op (csrc/cpu/linear.cpp), a multi-threaded matrix-vector kernel for
the few rows of decoding, with a fake tensor for torch.compile (autograd in C++, csrc/ops.cpp). Importing this module
loads (or builds) the extension.

Only few-row products are memory-bound, where torch's single-threaded CPU GEMV leaves most of the machine's read
rate unused; with more rows (or under autocast, which picks the matmul dtype) this calls torch's own GEMM, which a
GEMV cannot beat."""

import torch
import torch.nn.functional as F

from chargpt_kernels import ext_build

ext_build.require()

_linear_fwd = torch.ops.chargpt.linear_fwd.default

# The rows a call may have for the GEMV kernel: up to here it streams the weight at the machine's read rate and beats
# torch's GEMM (measured on the 2-core EPYC: 8 rows 21 vs 13 GB/s); decoding batches of up to 8 sequences take it.
GEMV_MAX_ROWS = 8
SUPPORTED_DTYPES = {"cpu": (torch.float32,), "cuda": ()}


@torch.library.register_fake("chargpt::linear_fwd")
def _linear_fwd_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear(x, weight, bias):
    """x (M, K) @ weight (N, K)^T + bias (N,) or None."""
    if x.shape[0] > GEMV_MAX_ROWS or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    return _linear_fwd(x, weight, bias)
