"""Helpers for the chargpt tests: where the corpus is, and how to run the CLIs in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a process needs on sys.path to import chargpt and chargpt_kernels from this checkout, installed or not.
CHECKOUT_PATH = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "kernels")])
# CHARGPT_CORPUS points elsewhere, e.g. on a lent GPU machine, where ../shared does not travel.
CORPUS = Path(os.environ.get("CHARGPT_CORPUS", REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
NO_CORPUS = f"the tiny shakespeare corpus is not at {CORPUS} (the project's shared data folder)"


def require_corpus():
    if not CORPUS.is_file():
        pytest.skip(NO_CORPUS)
    return CORPUS


def small_text():
    """About 60k characters to train on: the corpus's first lines, or a made-up play when it is absent."""
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8")[:60_000]
    words = "the king my lord good sir thou art what shall we do now come hither love death night day".split()
    lines = [f"{['ROMEO', 'JULIET', 'KING'][i % 3]}:\n" + " ".join(words[(i * 7 + j) % len(words)] for j in range(9))
             + ".\n" for i in range(1500)]
    return "\n".join(lines)


def cpu_flags():
    """This CPU's feature flags (/proc/cpuinfo), empty where there is no such file: which -march builds can run here."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def checkout_env(base=None, **extra):
    """os.environ (or `base`) with the checkout's packages first on PYTHONPATH, plus `extra`: for the fresh
    processes the tests start, which do not inherit pytest's sys.path."""
    env = dict(os.environ if base is None else base, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT_PATH, env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args, env=None, timeout=300, module=None):
    """Run `python -m chargpt.<module> args` (or `python args` when module is None) from the repo root."""
    # One thread: these tiny models gain nothing from more, and on a busy 2-core machine OpenMP threads that
    # spin-wait for each other make every op ~10x slower.
    full_env = checkout_env(OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable] + (["-m", f"chargpt.{module}"] if module else []) + [str(a) for a in args]
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def train(*args, **kwargs):
    return run_cli(*args, module="train", **kwargs)


def sample(*args, **kwargs):
    return run_cli(*args, module="sample", **kwargs)


def assert_one_line_error(result, prog, contains):
    """Non-zero exit, no traceback, and the error is one line on stderr that says `contains`."""
    assert result.returncode != 0, f"expected failure, got exit 0; stdout: {result.stdout[-500:]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"expected one error line, stderr was:\n{result.stderr}"
    assert errors[0].startswith(f"{prog}: error:") or errors[0].startswith(f"python -m {prog}: error:"), errors[0]
    assert contains in errors[0], f"{contains!r} not in {errors[0]!r}"
