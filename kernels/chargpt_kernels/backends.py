"""Backend selection: the one place that decides which implementation runs an op.

A backend maps op names to modules. Every module named for an op exposes a function of that name and a
`SUPPORTED_DTYPES = {"cpu": (...), "cuda": (...)}` table (eager takes every float dtype):

    layer_norm(x, weight, bias, eps) -> y            x: (M, N); weight, bias: (N,) or None
    rms_norm(x, weight, eps) -> y                    x: (M, N); weight: (N,) or None
    add_norm(x, residual, weight, bias, eps, norm, dropout_p) -> (y, h)   x, residual: (M, N); norm: layer | rms
    linear(x, weight, bias) -> y                     x: (M, K); weight: (N, K); bias: (N,) or None
    attention(q, k, v, is_causal, dropout_p, scale, attn_mask=None)
                                        q: (B, Hq, Tq, D); k, v: (B, Hk, Tk, D), Hk == Hq unless the module fuses
                                        "gqa" (Hq a multiple of Hk); attn_mask: None unless it fuses "mask", else a
                                        bool (True = take part) or float (added) (B, Hq, Tq, Tk) view, often stride 0
    SUPPORTED_FEATURES = {"cpu": ("mask", "gqa"), "cuda": (...)}   # optional: what the attention module fuses
                                                                   # beyond the plain op, per device type

Inputs reaching a backend have already been validated by `chargpt_kernels.api`; each backend wires its own autograd.
Fused backends draw attention-dropout randomness per the spec in `chargpt_kernels.reference`: one seed per forward call
from `reference.new_dropout_seed(device)`, as that call's first random draw, so a test can predict the mask.

Adding an op: one line in `OPS` below, and a function of that name in the backend modules of its family (a backend
without that module has no kernel for the op: `auto` passes it by, and naming it raises).
Adding a backend: one `Backend` entry below, with the check that says whether it can run here.
"""

import contextlib
import contextvars
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from chargpt_kernels.runtime import BackendUnavailable, triton_interpreted


def _triton_unavailable() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpreted()):
        return "triton needs a CUDA GPU (or TRITON_INTERPRET=1, set before triton is imported, to run on CPU)"
    return None


def _ext_unavailable() -> Optional[str]:
    from chargpt_kernels import ext_build  # imported on demand: it builds the extension on first call

    return ext_build.unavailable_reason()


@dataclass(frozen=True)
class Backend:
    module: str  # where an op family lives: "{family}" is replaced by the family's name (see OPS)
    unavailable: Callable[[], Optional[str]]  # None when the backend can run here, else one sentence why not
    devices: tuple  # device types `auto` may pick it for, best backend first across the table


BACKENDS = {
    "eager": Backend("chargpt_kernels.reference", lambda: None, ()),
    "triton": Backend("chargpt_kernels.triton_{family}", _triton_unavailable, ("cuda",)),
    "ext": Backend("chargpt_kernels.ext_{family}", _ext_unavailable, ("cuda", "cpu")),
}
CHOICES = (*BACKENDS, "auto")
# op name -> its family: the ops that share one module per backend (their kernels share loads, helpers, tests).
OPS = {"layer_norm": "layer_norm", "rms_norm": "layer_norm", "add_norm": "layer_norm", "attention": "attention",
       "linear": "linear"}

_current = contextvars.ContextVar("kernels_backend", default="auto")


def _check_choice(name):
    if name not in CHOICES:
        raise ValueError(f"unknown chargpt_kernels backend {name!r}; choose one of {', '.join(CHOICES)}")


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend `name` can run on this machine, else one sentence saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown chargpt_kernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name].unavailable()


def available_backends() -> list:
    """The backends that can run here, e.g. ['eager', 'triton', 'ext']."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the kernels ops inside the block on backend `name` (one of eager, triton, ext, auto)."""
    _check_choice(name)
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def current_backend() -> str:
    """The backend name ops use when called with backend=None: 'auto' unless a `use_backend` block says else."""
    return _current.get()


class _LazyModule:
    """A backend module, imported on first use. torch.compile cannot trace an import, but it can read `.module`
    of this (never replaced) object once `backend_for` has run outside the trace."""

    def __init__(self, path):
        self.path, self.module, self.missing = path, None, False

    def load(self):
        """The module, or None where the backend has no module for this family (no kernels for its ops)."""
        if self.module is None and not self.missing:
            try:
                self.module = importlib.import_module(self.path)
            except ModuleNotFoundError as e:
                if e.name != self.path:
                    raise
                self.missing = True
        return self.module


_IMPLS = {(name, op): _LazyModule(backend.module.format(family=family))
          for name, backend in BACKENDS.items() for op, family in OPS.items()}


def fused_candidates(device_type: str) -> tuple:
    """The fused backends `auto` tries for tensors on `device_type`, best first."""
    return tuple(name for name, backend in BACKENDS.items() if device_type in backend.devices)


def _missing(name, op, device_type, dtype, needs):
    """None when backend `name` runs `op` on these tensors with the features `needs`, else what it lacks."""
    if name == "eager":
        return None
    module = _IMPLS[name, op].load()
    if module is None or not hasattr(module, op):
        return f"has no {op} kernel"
    if dtype not in module.SUPPORTED_DTYPES.get(device_type, ()):
        return f"does not support {dtype} tensors on {device_type}"
    lacking = sorted(set(needs) - set(getattr(module, "SUPPORTED_FEATURES", {}).get(device_type, ())))
    if lacking:
        return f"does not fuse {op} with {' or '.join(lacking)}"
    return None


@torch.compiler.assume_constant_result
def backend_for(name: Optional[str], op: str, device_type: str, dtype: torch.dtype, needs: tuple = ()) -> str:
    """The name of the backend that runs `op` on `dtype` tensors of `device_type` when `name` (eager, triton, ext,
    auto, or None for the current one) is asked for; raises when that cannot work.

    `needs` names optional features of the request (attention: "mask", "gqa") that a backend module lists in its
    SUPPORTED_FEATURES. `auto` prefers triton for CUDA tensors and ext for CPU tensors, falling back to eager for
    anything the fused backends cannot take (another device, float64, a feature...). A backend named explicitly
    either runs or raises. torch.compile runs this once while tracing and keeps the answer, so a compiled graph
    keeps its backend.
    """
    name = name or _current.get()
    _check_choice(name)
    if op not in OPS:
        raise ValueError(f"unknown chargpt_kernels op {op!r}; the ops are {', '.join(OPS)}")
    if name == "auto":
        name = next((candidate for candidate in fused_candidates(device_type) if unavailable_reason(candidate) is None
                     and _missing(candidate, op, device_type, dtype, needs) is None), "eager")
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"chargpt_kernels backend {name!r} is unavailable: {reason}")
    if name == "triton" and device_type == "cpu" and not triton_interpreted():
        raise BackendUnavailable(
            "chargpt_kernels backend 'triton' got a CPU tensor: Triton runs on CUDA tensors, or on CPU only with "
            "TRITON_INTERPRET=1 set before triton is imported")
    missing = _missing(name, op, device_type, dtype, needs)
    if missing is not None:
        raise TypeError(f"chargpt_kernels backend {name!r} {missing}")
    _IMPLS[name, op].load()
    return name


_chosen = {}  # (name or the current one, op, device, dtype, needs) -> (backend, function), for choices made before


def choose(name: Optional[str], op: str, tensor: torch.Tensor, needs: tuple = ()) -> tuple:
    """(backend name, the function implementing `op` there) for `tensor` (see `backend_for`)."""
    if not torch.compiler.is_compiling():  # eager calls: a dict lookup instead of backend_for's ~1.5 us of Python
        key = (name or _current.get(), op, tensor.device, tensor.dtype, needs)
        chosen = _chosen.get(key)
        if chosen is None:  # only successful choices are kept; whatever backend_for raises, it raises every time
            backend = backend_for(key[0], op, tensor.device.type, tensor.dtype, needs)
            chosen = _chosen[key] = backend, getattr(_IMPLS[backend, op].module, op)
        return chosen
    backend = backend_for(name, op, tensor.device.type, tensor.dtype, needs)
    return backend, getattr(_IMPLS[backend, op].module, op)


def implementation(name: Optional[str], op: str, tensor: torch.Tensor, needs: tuple = ()) -> Callable:
    """The function implementing `op` for `tensor` on backend `name` (see `backend_for`)."""
    return choose(name, op, tensor, needs)[1]
