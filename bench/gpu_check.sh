#!/usr/bin/env bash
# The GPU check: on a CUDA machine, from the checkout, installing nothing, run every test (the CUDA ones included),
# every benchmark, and end-to-end training, and write the results into OUTDIR for bench/results/.
#
#   bash bench/gpu_check.sh OUTDIR [CORPUS]      # about 9 minutes on an H100
#
# CORPUS defaults to ../shared/data/tinyshakespeare/input.txt. E2E_ITERS (default 300) caps each compared
# training run of preset E2E_PRESET (default gpt); FULL_RUN=1 adds that preset's full --fused run (gpt: 5000
# iterations, the val-loss figure). PYTEST_ADDOPTS narrows the tests and benchmarks (e.g. -k layer_norm).
# The lent GPU machine gets the checkout only, not ../shared: copy the corpus into an ignored folder of the repo
# (e.g. .gpu-data/, listed in .git/info/exclude), carry it, and pass .gpu-data/input.txt as CORPUS.
# STEPS (default "tests bench e2e") picks what runs, to split the check over calls with a time limit.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR [CORPUS]}
cd "$(dirname "$0")/.."
corpus=$(realpath -m "${2:-../shared/data/tinyshakespeare/input.txt}")
export CHARGPT_CORPUS="$corpus"  # the tests that need the corpus read it from here
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
failed=()
steps=" ${STEPS:-tests bench e2e} "
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, remember failures, keep going
  local name=$1; shift
  case $name in versions|report) ;; *) [[ $steps == *" $name "* ]] || return 0 ;; esac
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1 || failed+=("$name")
  tail -n 3 "$out/$name.log"
  echo "   ($((SECONDS - start)) s)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1
step versions python3 -c "import torch, triton, chargpt_kernels; print('torch', torch.__version__, 'triton', triton.__version__,
 'gpu', torch.cuda.get_device_name(), 'backends', chargpt_kernels.available_backends())"
step tests python3 -m pytest tests -q -ra --junitxml "$out/tests.xml"
step bench python3 -m pytest bench --benchmark-only -q --benchmark-json "$out/bench.json"
[ -f "$out/bench.json" ] && step report python3 -m bench.report "$out/bench.json" --out "$out"
e2e_flags=(--out "$out/e2e" --preset "${E2E_PRESET:-gpt}" --iters "${E2E_ITERS:-300}")
[ -f "$corpus" ] && e2e_flags+=(--data "$corpus")
[ "${FULL_RUN:-0}" = 1 ] && e2e_flags+=(--full-fused)
step e2e python3 -m bench.e2e "${e2e_flags[@]}"

if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU check: FAILED steps: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "GPU check: all steps passed (results in $out)"
