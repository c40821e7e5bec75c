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
import os

import torch

BACKENDS = ("eager", "triton", "ext")
CHOICES = BACKENDS + ("auto",)

_MODULES = {
    "eager": ("kernels.reference", "kernels.reference"),
    "triton": ("kernels.triton_layer_norm", "kernels.triton_attention"),
    "ext": ("kernels.ext_layer_norm", "kernels.ext_attention"),
}
_current = contextvars.ContextVar("kernels_backend", default="auto")


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def _supports(name, op, tensor):
    if name == "eager":
        return True
    module = importlib.import_module(_MODULES[name][op])
    return tensor.dtype in module.SUPPORTED_DTYPES.get(tensor.device.type, ())


def resolve(name, op, tensor):
    """The module implementing `op` (0: layer_norm, 1: attention) for `tensor` on backend `name`.

    `auto` prefers triton for CUDA tensors and ext for CPU tensors, falling back to eager for anything the
    fused backends cannot take (another device, float64, ...). A backend named explicitly either runs or raises.
    """
    name = name or _current.get()
    if name == "auto":
        preferred = ("triton", "ext") if tensor.device.type == "cuda" else ("ext",)
        for candidate in preferred:
            if unavailable_reason(candidate) is None and _supports(candidate, op, tensor):
                name = candidate
                break
        else:
            name = "eager"
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"kernels backend {name!r} is unavailable: {reason}")
    if name == "triton" and tensor.device.type == "cpu" and not triton_interpreted():
        raise BackendUnavailable(
            "kernels backend 'triton' got a CPU tensor: Triton runs on CUDA tensors, or on CPU only with "
            "TRITON_INTERPRET=1 set before triton is imported")
    if not _supports(name, op, tensor):
        raise TypeError(f"kernels backend {name!r} does not support {tensor.dtype} tensors on {tensor.device.type}")
    return importlib.import_module(_MODULES[name][op])
