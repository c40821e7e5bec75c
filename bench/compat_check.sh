#!/usr/bin/env bash
# The support window, run: the CPU suite (Triton interpreter, the ext build and its tests, the AOT compiles) in a
# throwaway venv per torch/Triton pair we declare, from the checkout, installing nothing of ours (PYTHONPATH).
#
#   bash bench/compat_check.sh OUTDIR [STACK ...]      # STACK: oldest gpu newest (default: all three)
#   bash bench/compat_check.sh OUTDIR summary          # only rebuild OUTDIR/summary.md from the runs there
#
#   oldest  the floor pyproject.toml declares      torch 2.8.0  (Triton 3.4.0, which it pins)
#   gpu     the lent GPU machine's stack            torch 2.11.0 (Triton 3.6.0)
#   newest  the newest on PyPI when last run        torch 2.15.0 (Triton 3.9.0)
#
# Slow (a full suite per stack, ~15-30 min each on 2 cores, plus the downloads), so run by hand, not in CI.
# Each venv is kept under $COMPAT_DIR (default ~/.cache/chargpt/compat) and reused. PYTEST_ARGS narrows the run.
# This machine caps torch through a pip constraints file; these venvs alone lift it (PIP_CONFIG_FILE=/dev/null,
# so pip reads no config file); CI never does. OUTDIR gets <stack>/{versions.txt,pytest.log,junit.xml} and
# summary.md, the table to commit under bench/results/.
set -uo pipefail
out=$(realpath -m "${1:?usage: bash bench/compat_check.sh OUTDIR [oldest|gpu|newest ...]}"); shift
cd "$(dirname "$0")/.."
root=$PWD
stacks=("${@:-oldest gpu newest}")
read -r -a stacks <<< "${stacks[*]}"
cache=${COMPAT_DIR:-$HOME/.cache/chargpt/compat}
mkdir -p "$out" "$cache"
declare -A TORCH=([oldest]=2.8.0 [gpu]=2.11.0 [newest]=2.15.0)
# Triton's interpreter before 3.6 calls int() on 1-element arrays, which NumPy 2.4 refuses ("only 0-dimensional
# arrays can be converted to Python scalars"): an interpreter-only limit, pinned for the CPU suite.
declare -A EXTRA=([oldest]="numpy<2.4")
# What the test suite imports besides torch and triton (pyproject's runtime and dev dependencies, less the lint).
test_deps=(numpy ninja tqdm pytest pytest-benchmark matplotlib expecttest transformers)

for stack in "${stacks[@]}"; do
  [ "$stack" = summary ] && continue
  torch_version=${TORCH[$stack]:?unknown stack $stack (oldest, gpu, newest)}
  venv=$cache/torch-$torch_version
  dir=$out/$stack
  mkdir -p "$dir"
  echo "== $stack: torch $torch_version in $venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || exit 1
    PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install --quiet "torch==$torch_version" "${test_deps[@]}" ${EXTRA[$stack]:-} \
      > "$dir/install.log" 2>&1 || { echo "   install failed: $(tail -n 1 "$dir/install.log")"; continue; }
  fi
  "$venv/bin/python" - > "$dir/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform, torch, triton
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {version('transformers')}, Hugging Face kernels {version('kernels')}")
EOF
  cat "$dir/versions.txt"
  start=$SECONDS
  # A fresh ext build folder per stack: the cache key has the torch version, but keep these builds apart anyway.
  PYTHONPATH="$root:$root/kernels" CHARGPT_EXT_DIR="$cache/ext-$torch_version" \
    "$venv/bin/python" -m pytest -q -ra -p no:cacheprovider --junitxml "$dir/junit.xml" ${PYTEST_ARGS:-} \
    > "$dir/pytest.log" 2>&1
  echo "   exit $?, $((SECONDS - start)) s: $(tail -n 1 "$dir/pytest.log")"
  echo $((SECONDS - start)) > "$dir/seconds"
done

python3 - "$out" <<'EOF'
"""summary.md: one row per stack (versions, counts, wall time) and every failure with its first message line."""
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rows, failures = [], []
for d in sorted(p for p in out.iterdir() if (p / "junit.xml").exists()):
    suite = ET.parse(d / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    seconds = (d / "seconds").read_text().strip() if (d / "seconds").exists() else "?"
    rows.append(f"| {d.name} | {(d / 'versions.txt').read_text().strip()} | {passed} | {n['failures']} | "
                f"{n['errors']} | {n['skipped']} | {seconds} |")
    for case in failed:
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        message = (problem.get("message") or problem.text or "").strip().splitlines()
        failures.append(f"- {d.name}: `{case.get('classname')}::{case.get('name')}`: "
                        f"{message[0][:200] if message else ''}")
text = ["| stack | versions | passed | failed | errors | skipped | seconds |", "|---|---|---:|---:|---:|---:|---:|",
        *rows, "", "Failures:" if failures else "No failures.", *failures]
(out / "summary.md").write_text("\n".join(text) + "\n")
print("\n".join(text))
EOF
