"""bench/gpu_check.sh rehearsed on CPU: DRY_RUN=1 runs every step of the GPU check at tiny sizes, so a broken step
is found here and not on a lent GPU, whose minutes are few."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from chargpt_helpers import REPO_ROOT

STEPS = ("versions", "selection", "tests", "bench", "report", "e2e")


def dry_run_env(bin_dir):
    """This process's environment for the script, without what this pytest session put there: PYTEST_ADDOPTS (a
    CI's --junitxml, say), PYTEST_CURRENT_TEST and the like would reach the nested pytest runs, and TRITON_INTERPRET
    (set by conftest) would change which backends the steps see. The script calls `python3`: this interpreter."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_CORE_")) and k not in ("TRITON_INTERPRET", "DRY_RUN", "STEPS")}
    python3 = bin_dir / "python3"  # a wrapper, not a symlink: a venv's python finds its packages by its own path
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["DRY_RUN"] = "1"
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="the GPU check is a bash script")
def test_dry_run_runs_every_step_and_prints_the_summary(tmp_path):
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    bin_dir.mkdir()
    run = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(out)], cwd=tmp_path,
                         env=dry_run_env(bin_dir), capture_output=True, text=True, timeout=1200)
    report = f"exit {run.returncode}\nstdout:\n{run.stdout[-6000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert run.returncode == 0, report
    assert "estimate (s, not a measurement):" in run.stdout, report
    assert "GPU check summary (DRY RUN)" in run.stdout, report
    summary = run.stdout.split("GPU check summary (DRY RUN)", 1)[1]
    for step in STEPS:
        assert (out / f"{step}.log").is_file(), f"no log for step {step}\n{report}"
        assert re.search(rf"^{step} +passed +\d+ s", summary, re.MULTILINE), f"step {step} not passed\n{report}"
    tests = re.search(r"^tests .*?(\d+) passed, 0 failed, 0 errors, (\d+) skipped", summary, re.MULTILINE)
    assert tests and int(tests.group(1)) > 0, report
    assert re.search(r"^versions: torch \S+ triton \S+ gpu none backends \[", summary, re.MULTILINE), report
    assert re.search(rf"^results: +{re.escape(str(out))}", summary, re.MULTILINE), report
    assert re.search(r"^total: +\d+ s \(estimate \d+ s\)", summary, re.MULTILINE), report
    assert "GPU check: all steps passed" in summary, report

    # One benchmark per bench file ran (or was skipped), timed and reported; both e2e variants trained.
    bench_files = sorted(p.name for p in (REPO_ROOT / "bench").glob("bench_*.py"))
    rows = json.loads((out / "bench.json").read_text())["benchmarks"]
    counts = re.search(r"(\d+) passed(?:, (\d+) skipped)?", (out / "bench.log").read_text().splitlines()[-1])
    assert counts and int(counts.group(1)) + int(counts.group(2) or 0) == len(bench_files), report
    assert len(rows) == int(counts.group(1)) > 0
    assert (out / "bench.md").is_file()
    e2e = json.loads((out / "e2e" / "e2e.json").read_text())
    assert set(e2e) == {"eager", "fused"} and all(r["iters"] == 5 for r in e2e.values()), e2e
