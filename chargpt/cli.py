"""What both command lines share: one-line errors and the choice of device."""

import argparse
import sys

import torch

from chargpt import ChargptError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def resolve_device(name):
    """torch.device for `name` (cpu, cuda, cuda:1, ...); None means cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ChargptError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ChargptError(f"unsupported device {name!r}; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChargptError(f"--device {name}: no CUDA GPU is available here")
    return device


def run(command, args, prog):
    """Call command(args); a ChargptError or a file-system error (an unwritable --out-dir, a full disk) becomes
    one line on stderr and exit status 1, never a traceback."""
    try:
        return command(args)
    except (ChargptError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
