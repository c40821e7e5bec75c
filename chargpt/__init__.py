"""chargpt: a character-level GPT on tiny shakespeare whose attention and LayerNorm run on `chargpt_kernels` backends.

    python -m chargpt.train --fused          # train (gpt on CUDA, gpt-cpu on CPU)
    python -m chargpt.sample --out-dir out   # sample from the best checkpoint
"""


class ChargptError(Exception):
    """A problem the user can fix (bad file, bad flag, bad checkpoint). The CLIs print it as one line and exit 1."""
