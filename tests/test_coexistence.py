"""chargpt_kernels beside Hugging Face's `kernels` package, which transformers >= 5.25 requires and imports.

Each check runs in a fresh process (sys.path as a user gets it, not pytest's), started from the checkout's root
(where the kernels/ folder sits on sys.path) and from an unrelated folder, with the packages found the way they
were installed, or through PYTHONPATH pointing at the checkout (as bench/gpu_check.sh runs it). In every case
`import kernels` must be Hugging Face's package, a transformers model module must import, chargpt_kernels must run
attention on a fused backend, and `python -m chargpt.train --fused` must train.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from chargpt_helpers import CHECKOUT_PATH, REPO_ROOT, small_text

CHECK = """
import json, warnings
import torch
import kernels
from transformers.models.llama import modeling_llama  # transformers' hub-kernels integration imports `kernels`
import chargpt_kernels
from chargpt_kernels import reference

gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 3, 7, 40, generator=gen) for _ in range(3))
expected = reference.attention(q.double(), k.double(), v.double(), is_causal=True)
errors = {}
fused = [b for b in chargpt_kernels.available_backends() if b != "eager"]
for backend in fused:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch warns: make it fail here
        out = chargpt_kernels.causal_attention(q, k, v, backend=backend)
    errors[backend] = (out.double() - expected).abs().max().item()
print(json.dumps({"kernels_file": kernels.__file__, "hf_api": hasattr(kernels, "get_kernel"),
                  "chargpt_kernels_file": chargpt_kernels.__file__, "llama": modeling_llama.__name__,
                  "errors": errors}))
"""


def _installed(distribution):
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _chargpt_installed():
    """Whether this interpreter imports chargpt and chargpt_kernels from anywhere: installed, not merely found
    through pytest's path or an egg-info left in the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import chargpt, chargpt_kernels"], env=env,
                           cwd=tempfile.gettempdir(), capture_output=True, timeout=300)
    return probe.returncode == 0


def _environment(how):
    """The environment of a fresh process: packages as installed, or the checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # so triton runs (on CPU tensors) beside ext
    if how == "pythonpath":
        env["PYTHONPATH"] = CHECKOUT_PATH
    elif not _chargpt_installed():
        pytest.skip("chargpt is not installed here (pip install -e .): only the PYTHONPATH route can be checked")
    return env


@pytest.fixture(params=["checkout-root", "other-folder"])
def cwd(request, tmp_path):
    return REPO_ROOT if request.param == "checkout-root" else tmp_path


@pytest.fixture(autouse=True)
def hugging_face_stack():
    for distribution in ("transformers", "kernels"):
        if not _installed(distribution):
            pytest.skip(f"{distribution} is not installed (pip install -e '.[dev]' brings both)")


@pytest.mark.parametrize("how", ["installed", "pythonpath"])
def test_drop_in_imports_beside_hugging_face_kernels(cwd, how):
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=_environment(how), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["hf_api"] and not Path(found["kernels_file"]).is_relative_to(REPO_ROOT), \
        f"`import kernels` did not give Hugging Face's package: {found['kernels_file']}"
    assert found["chargpt_kernels_file"] == str(REPO_ROOT / "kernels" / "chargpt_kernels" / "__init__.py")
    assert found["errors"], "no fused backend ran: chargpt_kernels.available_backends() lists eager only"
    for backend, error in found["errors"].items():
        assert error < 1e-5, f"{backend}: max abs error {error:.2e} against float64"


@pytest.mark.parametrize("how", ["installed", "pythonpath"])
def test_fused_training_runs_beside_hugging_face_kernels(cwd, how, tmp_path):
    data = tmp_path / "input.txt"
    data.write_text(small_text(), encoding="utf-8")
    command = [sys.executable, "-m", "chargpt.train", "--fused", "--preset", "tiny", "--device", "cpu",
               "--max-iters", "3", "--eval-interval", "3", "--eval-iters", "1", "--data", str(data),
               "--out-dir", str(tmp_path / "out")]
    run = subprocess.run(command, cwd=cwd, env=_environment(how), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kernels"] != "eager" and summary["iters"] == 3
    assert set(summary["kernels_by_op"].values()) - {"eager"}, f"nothing ran fused: {summary['kernels_by_op']}"
