"""The run-level choice of kernels backend: which backend a training or sampling run builds its model with.

ARCH: chargpt stands on `kernels`. Inside chargpt only the model file (chargpt/model.py, which calls the ops)
and this module (which asks the seam `kernels.backends` what can run here) touch `kernels`.
"""

import torch

from chargpt import ChargptError
from kernels import backends

KERNEL_CHOICES = backends.CHOICES  # eager, triton, ext, auto


def choose_kernels(requested, device_type, require_fused=False):
    """The backend to record for a run: `requested` itself, or what `auto` picks for `device_type`.

    Raises ChargptError with the reason when the backend cannot run here, or when `require_fused` (--fused) and
    auto would fall back to eager.
    """
    try:
        chosen = backends.backend_for(requested, "attention", device_type, torch.float32)
    except (ValueError, TypeError, backends.BackendUnavailable) as e:
        raise ChargptError(str(e)) from None
    if require_fused and chosen == "eager":
        why = "; ".join(f"{name}: {backends.unavailable_reason(name)}"
                        for name in backends.fused_candidates(device_type))
        raise ChargptError(f"--fused: no fused kernel backend runs on {device_type} here ({why}); "
                           f"use --kernels eager")
    return chosen
