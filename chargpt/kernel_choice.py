"""The run-level choice of kernels backend: which backend each op of a training or sampling run uses, decided and
checked before the first step, so that a backend that cannot take the run's tensors stops the run with one line.

ARCH: chargpt stands on `chargpt_kernels`. Inside chargpt only the model file (chargpt/model.py, which calls the ops)
and this module (which asks the seam `chargpt_kernels.backends` what can run here) touch `chargpt_kernels`.
"""

from dataclasses import dataclass

import torch

from chargpt import ChargptError
from chargpt_kernels import backends

KERNEL_CHOICES = backends.CHOICES  # eager, triton, ext, auto
_CHOICE_ERRORS = (ValueError, TypeError, backends.BackendUnavailable)
# Ops a model calls only where a fused kernel runs them, taking its plain path elsewhere (chargpt.model: add_norm,
# else the residual add and layer_norm): a backend without one is no error, and by_op lists one only where it runs.
OPTIONAL_OPS = ("add_norm",)


@dataclass(frozen=True)
class KernelChoice:
    name: str  # what the model is built with and the run records: the backend of every op, or auto when they differ
    by_op: dict  # op -> the backend that runs it, for the ops the model uses
    note: str | None = None  # one line for the user when auto leaves some ops on eager

    def describe(self):
        if self.name != "auto" or not self.by_op:
            return self.name
        return "auto (" + ", ".join(f"{op} {backend}" for op, backend in self.by_op.items()) + ")"


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def choose_kernels(requested, device_type, op_dtypes, require_fused=False):
    """The KernelChoice for a run asking for backend `requested` (eager, triton, ext, auto) on `device_type`, whose
    model feeds each op the dtype in `op_dtypes` ({op: dtype}, see chargpt.model.kernel_dtypes). An op of
    OPTIONAL_OPS is in by_op only where a fused kernel runs it.

    A backend named explicitly must take every op at its dtype, else ChargptError says which does not. `auto` gives
    each op the fused backend when it takes the op's dtype, else eager, and says so in `note`; the model is then
    built with `auto`, whose per-call choice is the same. With `require_fused` (--fused), a machine where no fused
    backend runs, or where none takes any op at its dtype, is an error too.
    """
    try:
        # Whether the backend runs on this device at all (the dtypes come next): what a float32 run would use.
        base = backends.backend_for(requested, "attention", device_type, torch.float32)
    except _CHOICE_ERRORS as e:
        raise ChargptError(str(e)) from None
    if require_fused and base == "eager":
        why = "; ".join(f"{name}: {backends.unavailable_reason(name)}"
                        for name in backends.fused_candidates(device_type))
        raise ChargptError(f"--fused: no fused kernel backend runs on {device_type} here ({why}); "
                           f"use --kernels eager")
    by_op = {}
    for op, dtype in op_dtypes.items():
        if op in OPTIONAL_OPS:
            try:
                backend = backends.backend_for(requested, op, device_type, dtype)
            except TypeError:  # this backend has no such kernel for these tensors: the model's plain path
                continue
            if backend != "eager":
                by_op[op] = backend
            continue
        try:
            by_op[op] = backends.backend_for(requested, op, device_type, dtype)
        except _CHOICE_ERRORS as e:
            other = " or --dtype float32" if dtype != torch.float32 else ""
            raise ChargptError(f"--kernels {requested} cannot run this model's {op}, which gets "
                               f"{_dtype_name(dtype)} tensors on {device_type} ({e}); use --kernels auto (eager for "
                               f"what no fused kernel takes){other}") from None
    eager_ops = [op for op, backend in by_op.items() if backend == "eager"]
    note = None
    if requested == "auto" and base != "eager" and eager_ops:
        if require_fused and len(eager_ops) == len(by_op):
            raise ChargptError(f"--fused: no fused kernel here takes the tensors of this run on {device_type} ("
                               + ", ".join(f"{op}: {_dtype_name(op_dtypes[op])}" for op in eager_ops)
                               + "); use --dtype float32 or --kernels eager")
        fused = [f"{op} runs {backend}" for op, backend in by_op.items() if backend != "eager"]
        note = ("kernels auto: " + ", ".join(f"{op} runs eager (no fused kernel here takes "
                                             f"{_dtype_name(op_dtypes[op])} on {device_type} yet)" for op in eager_ops)
                + "".join(f", {line}" for line in fused))
    chosen = set(by_op.values())
    name = chosen.pop() if len(chosen) == 1 else "auto" if chosen else base
    return KernelChoice(name, by_op, note)
