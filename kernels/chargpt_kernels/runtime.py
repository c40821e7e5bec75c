"""Facts about this process that backends and the seam both need; a leaf module, so nothing imports up."""

import os


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""


def triton_interpreted() -> bool:
    """Whether Triton runs through its CPU interpreter (TRITON_INTERPRET=1, which must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
