"""chargpt.sample on a checkpoint written by a short `tiny` training run, under every available backend."""

import pytest
import torch

import chargpt_kernels

from chargpt_helpers import assert_one_line_error, sample, small_text, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "input.txt"
    data.write_text(small_text(), encoding="utf-8")
    out = tmp_path_factory.mktemp("run")
    result = train("--preset", "tiny", "--device", "cpu", "--max-iters", "10", "--data", data, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out


# On CPU, where every backend computes in exact float32, so the same seed gives the same text.
SAMPLE_ARGS = ("--device", "cpu", "--prompt", "The ", "--max-new-tokens", "40", "--seed", "7", "--num-samples", "2")


@pytest.fixture(scope="module")
def eager_samples(run_dir):
    result = sample("--out-dir", run_dir, *SAMPLE_ARGS, "--kernels", "eager")
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("backend", chargpt_kernels.available_backends())
def test_sample_under_any_backend(run_dir, eager_samples, backend):
    """Trained with eager, sampled with each backend: same seed, same text."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1, which a CUDA run does not set")
    result = eager_samples if backend == "eager" else sample("--out-dir", run_dir, *SAMPLE_ARGS, "--kernels", backend)
    assert result.returncode == 0, result.stderr
    assert f"sampling with kernels {backend}" in result.stderr
    first, second = result.stdout.split("---------------\n")
    assert first.startswith("The ") and len(first) == len("The ") + 40 + 1 and first != second
    assert result.stdout == eager_samples.stdout


def test_sample_from_last_checkpoint(run_dir):
    result = sample("--out-dir", run_dir, "--checkpoint", "last", "--max-new-tokens", "10", "--temperature", "0",
                    "--kernels", "eager", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "iter 10" in result.stderr


def test_prompt_outside_vocabulary_is_one_line(run_dir):
    result = sample("--out-dir", run_dir, "--prompt", "Ωmega")
    assert_one_line_error(result, "chargpt.sample", "outside the model's vocabulary: 'Ω'")


def test_missing_or_corrupt_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(sample("--out-dir", tmp_path), "chargpt.sample", "no checkpoint at")
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(sample("--out-dir", tmp_path), "chargpt.sample", "damaged or not a checkpoint")
