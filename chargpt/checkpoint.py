"""Checkpoint files: written atomically, read back with one clear error when missing or damaged.

`best.pt` holds the weights with the best validation loss (what sampling reads); `ckpt.pt` holds everything
needed to resume exactly (weights, optimizer, iteration, RNG states). Both carry the model configuration and the
tokenizer's vocabulary, so a checkpoint needs nothing else to sample from.
"""

import os
import tempfile
from pathlib import Path

import torch

from chargpt import ChargptError

BEST, LAST = "best.pt", "ckpt.pt"
REQUIRED_KEYS = ("model", "model_config", "vocab", "kernels", "iter_num")


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file beside `path`, then rename over it: a crash mid-write leaves the old file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise ChargptError(f"no checkpoint at {path}; train first with python -m chargpt.train --out-dir "
                           f"{path.parent}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; the user needs only the first line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChargptError(f"cannot read checkpoint {path}: it is damaged or not a checkpoint ({detail[:160]})") \
            from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise ChargptError(f"{path} is not a chargpt checkpoint")
    return checkpoint
