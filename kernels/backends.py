"""Backend selection: the one place that decides which implementation runs an op.

A backend is a pair of modules, one per op family, each exposing the same small interface:

    layer_norm(x, weight, bias, eps) -> y            x: (M, N); weight, bias: (N,) or None
    attention(q, k, v, is_causal, dropout_p, scale)  q: (B, H, Tq, D); k, v: (B, H, Tk, D)
    SUPPORTED_DTYPES = {"cpu": (...), "cuda": (...)}   # eager (kernels.reference) takes every float dtype

Inputs reaching a backend have already been validated by `kernels.api`; each backend wires its own autograd.
Fused backends draw attention-dropout randomness per the spec in `kernels.reference`: one seed per forward call
from `reference.new_dropout_seed(device)`, as that call's first random draw, so a test can predict the mask.
"""

import contextlib
import contextvars
import importlib

import torch

from kernels.runtime import BackendUnavailable, triton_interpreted

BACKENDS = ("eager", "triton", "ext")
CHOICES = BACKENDS + ("auto",)

_MODULES = {
    "eager": ("kernels.reference", "kernels.reference"),
    "triton": ("kernels.triton_layer_norm", "kernels.triton_attention"),
    "ext": ("kernels.ext_layer_norm", "kernels.ext_attention"),
}
_current = contextvars.ContextVar("kernels_backend", default="auto")


def unavailable_reason(name):
    """None when backend `name` can run on this machine, else one sentence saying why not."""
    if name == "eager":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed"
        if not (torch.cuda.is_available() or triton_interpreted()):
            return "triton needs a CUDA GPU (or TRITON_INTERPRET=1, set before triton is imported, to run on CPU)"
        return None
    if name == "ext":
        from kernels import ext_build

        return ext_build.unavailable_reason()
    raise ValueError(f"unknown kernels backend {name!r}; choose one of {', '.join(CHOICES)}")


def available_backends():
    """The backends that can run here, e.g. ['eager', 'triton', 'ext']."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the block on backend `name` (one of eager, triton, ext, auto)."""
    if name not in CHOICES:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {', '.join(CHOICES)}")
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def current_backend():
    return _current.get()


LAYER_NORM, ATTENTION = 0, 1  # index of an op family in _MODULES


class _LazyModule:
    """A backend module, imported on first use by `select`. torch.compile cannot trace an import, but it can read
    `.module` of this (never replaced) object once `select` has run outside the trace."""

    def __init__(self, path):
        self.path, self.module = path, None

    def load(self):
        if self.module is None:
            self.module = importlib.import_module(self.path)
        return self.module


_IMPLS = {(name, op): _LazyModule(path) for name, paths in _MODULES.items() for op, path in enumerate(paths)}


def fused_candidates(device_type):
    """The fused backends `auto` tries for tensors on `device_type`, best first."""
    return ("triton", "ext") if device_type == "cuda" else ("ext",)


def _supports(name, op, device_type, dtype):
    if name == "eager":
        return True
    return dtype in _IMPLS[name, op].load().SUPPORTED_DTYPES.get(device_type, ())


@torch.compiler.assume_constant_result
def select(name, op, device_type, dtype):
    """The backend that runs `op` (LAYER_NORM or ATTENTION) on `dtype` tensors of `device_type` when `name`
    (eager, triton, ext, auto or None for the current one) is asked for; raises when that cannot work.

    `auto` prefers triton for CUDA tensors and ext for CPU tensors, falling back to eager for anything the
    fused backends cannot take (another device, float64, ...). A backend named explicitly either runs or raises.
    torch.compile runs this once while tracing and keeps the answer, so a compiled graph keeps its backend.
    """
    name = name or _current.get()
    if name not in CHOICES:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {', '.join(CHOICES)}")
    if name == "auto":
        name = next((candidate for candidate in fused_candidates(device_type) if unavailable_reason(candidate) is None
                     and _supports(candidate, op, device_type, dtype)), "eager")
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"kernels backend {name!r} is unavailable: {reason}")
    if name == "triton" and device_type == "cpu" and not triton_interpreted():
        raise BackendUnavailable(
            "kernels backend 'triton' got a CPU tensor: Triton runs on CUDA tensors, or on CPU only with "
            "TRITON_INTERPRET=1 set before triton is imported")
    if not _supports(name, op, device_type, dtype):
        raise TypeError(f"kernels backend {name!r} does not support {dtype} tensors on {device_type}")
    _IMPLS[name, op].load()
    return name


_resolved = {}  # (name or the current one, op, device, dtype) -> module, for choices `select` made before


def resolve(name, op, tensor):
    """The module implementing `op` for `tensor` on backend `name` (see `select`)."""
    if not torch.compiler.is_compiling():  # eager calls: a dict lookup instead of select's ~1.5 us of Python
        key = (name or _current.get(), op, tensor.device, tensor.dtype)
        module = _resolved.get(key)
        if module is None:  # only successful choices are kept; whatever select raises, it raises every time
            module = _resolved[key] = _IMPLS[select(key[0], op, tensor.device.type, tensor.dtype), op].module
        return module
    return _IMPLS[select(name, op, tensor.device.type, tensor.dtype), op].module
