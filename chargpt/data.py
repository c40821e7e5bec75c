"""The corpus, the character tokenizer, the 90/10 split and random (B, T) training batches.

The default corpus is tiny shakespeare: read from the cache folder, else downloaded once and verified by sha256.
Any UTF-8 text file works instead (`--data PATH`), which is also how machines without internet train.
"""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from chargpt import ChargptError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


def cache_dir():
    """Where downloads live: $XDG_CACHE_HOME/chargpt, by default ~/.cache/chargpt."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chargpt"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def tiny_shakespeare_path():
    """The verified tiny shakespeare file in the cache, downloading it first if it is missing or damaged."""
    path = cache_dir() / "tinyshakespeare.txt"
    if path.is_file() and sha256(path.read_bytes()) == TINY_SHAKESPEARE_SHA256:
        return path
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ChargptError(f"cannot download tiny shakespeare from {TINY_SHAKESPEARE_URL} ({reason}); "
                           f"offline, pass --data PATH to a local copy or any UTF-8 text file") from None
    digest = sha256(data)
    if digest != TINY_SHAKESPEARE_SHA256:
        raise ChargptError(f"checksum mismatch for {TINY_SHAKESPEARE_URL}: got sha256 {digest}, expected "
                           f"{TINY_SHAKESPEARE_SHA256}; pass --data PATH to a trusted copy")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted download never leaves a half file in the cache.
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    return path


def load_text(path=None):
    """The training text: the file at `path`, or tiny shakespeare when `path` is None."""
    path = tiny_shakespeare_path() if path is None else Path(path)
    if not path.exists():
        raise ChargptError(f"data file not found: {path}")
    if not path.is_file():
        raise ChargptError(f"data path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChargptError(f"data file is not UTF-8 text: {path} (byte {e.start})") from None
    if not text:
        raise ChargptError(f"data file is empty: {path}")
    return text


class CharTokenizer:
    """One token per distinct character, in sorted order (the vocabulary string is stored in checkpoints)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.index = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    def __len__(self):
        return len(self.vocab)

    def unknown_chars(self, text):
        return sorted(set(text) - self.index.keys())

    def encode(self, text):
        return [self.index[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def split(tokens, train_fraction=TRAIN_FRACTION):
    """The first 90% of the token stream trains, the rest validates (by position, so no text leaks across)."""
    n = int(train_fraction * len(tokens))
    return tokens[:n], tokens[n:]


class Dataset:
    """The encoded corpus, split by position, with a sampler of random (x, y) windows of `block_size`."""

    def __init__(self, text, block_size, tokenizer=None):
        self.tokenizer = tokenizer or CharTokenizer.from_text(text)
        unknown = self.tokenizer.unknown_chars(text)
        if unknown:
            raise ChargptError(f"the text has characters outside the checkpoint's vocabulary: "
                               f"{''.join(unknown)[:20]!r}")
        ids = np.array(self.tokenizer.encode(text), dtype=np.int64)
        self.train, self.val = (torch.from_numpy(part) for part in split(ids))
        if len(self.val) < block_size + 1:
            raise ChargptError(f"the text is too short: {len(ids)} characters leave {len(self.val)} for validation "
                               f"(the last 10%), but block_size {block_size} needs at least {block_size + 1}")
        self.block_size = block_size

    def batch(self, split_name, batch_size, seed, device):
        """`batch_size` random windows from one split: inputs x and next-character targets y, both (B, T).

        Positions come from a generator seeded by `seed` alone (the caller mixes in the iteration and rank), so
        the batch sequence needs no saved state to replay exactly after a resume.
        """
        data = self.train if split_name == "train" else self.val
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        offsets = torch.arange(self.block_size + 1)
        windows = data[starts[:, None] + offsets]
        x, y = windows[:, :-1], windows[:, 1:]
        if device.type == "cuda":
            # Pinned host memory lets the copy overlap with the GPU still running the previous step.
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def batch_seed(*parts):
    """A well-mixed 63-bit seed from small integers (run seed, split, iteration, rank)."""
    return int(np.random.SeedSequence(parts).generate_state(2, np.uint64)[0] >> np.uint64(1))
