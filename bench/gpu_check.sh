#!/usr/bin/env bash
# The GPU check: on a CUDA machine, from the checkout, installing nothing, run the tests that exercise CUDA, the
# benchmarks at the gpt model's shapes, and end-to-end training, and write the results into OUTDIR for bench/results/.
#
#   bash bench/gpu_check.sh OUTDIR [CORPUS]            # about 5.5 minutes on an H100, by the estimate below
#   DRY_RUN=1 bash bench/gpu_check.sh OUTDIR [CORPUS]  # every step on CPU at tiny sizes (~2 minutes, no GPU, no
#                                                      # network): finds a script error here, not on the lent GPU
#
# Estimate for the defaults (seconds; reasoned, not measured: no GPU has run it yet; H100, 16 cores, cold caches):
#   versions  60  the first import JIT-builds the C++/CUDA extension: nvcc for sm_90, 8 files in parallel (one .cu
#                 file takes 65-72 s alone on a busy 2-core CPU)
#   tests    130  ~810 cases (~580 of them CUDA ones) at ~40 ms, plus Triton's JIT compiles and autotuning on a cold
#                 cache (most of it), plus one training process
#   bench     80  51 cases at ~0.6 s each (--benchmark-max-time 0.5) plus the attention kernels' autotuning
#   report    15  matplotlib's first import on a fresh machine builds its font cache
#   e2e       50  two training processes (~8 s to start each), 200 steps at ~25 ms, evaluations of 20 batches, the
#                 fused run's autotuning
#   total    335
# Every step but versions is stopped (SIGINT: pytest still writes its junit XML and benchmark JSON) at
# CAP_PERCENT (default 150, dry run 400; 0: never) of its estimate, at least 30 s, so an estimate gone wrong still
# ends with the summary inside a 10-minute command limit; split the check over calls with STEPS instead.
#
# What runs (the defaults fit the estimate; widen them in a call of their own):
#   TESTS    test files / node ids (default: those that run CUDA code; TESTS=tests runs every test)
#   TESTS_K  their -k (default "not cpu and not cuda-float16": CPU cases are CI's; fp16 runs bf16's kernels)
#   BENCH_K  the benchmarks' -k (default: the gpt model's shapes, no torch.compile baseline; BENCH_K= runs all)
#   E2E_PRESET (default gpt), E2E_ITERS (default 200) and E2E_VARIANTS (comma-separated, default "eager,fused";
#   also "eager + compile", "fused + compile", ...) of bench.e2e; FULL_RUN=1 adds the preset's full --fused run
#   (gpt: 5000 iterations, the val-loss figure, minutes more). STEPS (default "tests bench e2e") picks what runs.
#   PYTEST_ADDOPTS adds options to every pytest step (its -k counts only where TESTS_K / BENCH_K are empty).
# CORPUS defaults to ../shared/data/tinyshakespeare/input.txt. The lent GPU machine gets the checkout only, not
# ../shared: copy the corpus into an ignored folder of the repo (e.g. .gpu-data/, listed in .git/info/exclude),
# carry it, and pass .gpu-data/input.txt as CORPUS. A dry run without the corpus writes a small text of its own.
# The end prints a one-screen summary: each step's result and seconds, the test counts, the versions, the total.
set -uo pipefail
out=${1:?usage: [DRY_RUN=1] bash bench/gpu_check.sh OUTDIR [CORPUS]}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(realpath "$out")
corpus=$(realpath -m "${2:-../shared/data/tinyshakespeare/input.txt}")
dry=${DRY_RUN:-0}
[ "$dry" = 1 ] || dry=0
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
steps=" ${STEPS:-tests bench e2e} "
pytest_opts=()
if [ "$dry" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # CPU even on a GPU machine: conftest then runs Triton interpreted
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny sizes on a busy CPU: spin-waiting threads only slow them
  pytest_opts=(-p no:cacheprovider)  # it may run inside another pytest session: leave the checkout's cache alone
  if [ ! -f "$corpus" ]; then  # no network: train on a made-up text rather than download
    corpus="$out/corpus.txt"
    for i in $(seq 400); do echo "KING $i: what light through yonder window breaks, good sir? thou art the sun."; done \
      > "$corpus"
  fi
fi
export CHARGPT_CORPUS="$corpus"  # the tests that need the corpus read it from here
cap_percent=${CAP_PERCENT:-$([ "$dry" = 1 ] && echo 400 || echo 150)}

# The selections: the real run's, then the dry run's tiny ones (the dry run also collects the real ones, so a
# renamed test file or a bad -k is found on CPU, in its step "selection").
set -f  # node ids may hold [ ]: words, not globs
real_tests=(${TESTS:-tests/test_attention.py tests/test_attention_masks.py tests/test_layer_norm.py tests/test_norms.py
  tests/test_triton_fixes.py tests/test_triton_norms.py tests/test_triton_torch_compile.py tests/test_fused_model.py
  tests/test_train.py::test_tiny_fused_run_on_cuda})
set +f
real_tests_k=${TESTS_K-not cpu and not cuda-float16}
real_bench_k=${BENCH_K-(256x64 or 16384x384-bfloat16 or decode or train_step) and not torch.compile}
k_opt() { [ -n "$1" ] && printf '%s\n' -k "$1"; }  # -k EXPR, or nothing for an empty expression
mapfile -t tests_k < <(k_opt "$real_tests_k")
mapfile -t bench_k < <(k_opt "$real_bench_k")
tests_sel=("${real_tests[@]}" "${tests_k[@]}")
bench_sel=(bench "${bench_k[@]}" --benchmark-max-time 0.5)  # ample rounds for GPU ops of us to ms
e2e_flags=(--out "$out/e2e" --preset "${E2E_PRESET:-gpt}" --iters "${E2E_ITERS:-200}" --train-flags "--eval-iters 20")
IFS=, read -ra variants <<< "${E2E_VARIANTS:-eager,fused}"
e2e_flags+=(--variants "${variants[@]}")
if [ "$dry" = 1 ]; then
  tests_sel=(tests/test_layer_norm.py -k "1-wb-cpu or backend_selection")  # 6 run (triton interpreted), 1 skips
  e2e_flags=(--out "$out/e2e" --preset tiny --iters 5 --variants eager fused --train-flags "--device cpu")
fi
[ -f "$corpus" ] && e2e_flags+=(--data "$corpus")
[ "${FULL_RUN:-0}" = 1 ] && [ "$dry" = 0 ] && e2e_flags+=(--full-fused)

# Per-step estimates in seconds (see the header; the dry run's were measured on a busy 2-core CPU, the extension
# already built: its first build there takes minutes).
if [ "$dry" = 1 ]; then
  declare -A estimate=([versions]=15 [selection]=25 [tests]=25 [bench]=30 [report]=5 [e2e]=40)
else
  declare -A estimate=([versions]=60 [tests]=130 [bench]=80 [report]=15 [e2e]=50)
fi
order=(versions selection tests bench report e2e)
declare -A result seconds
planned=0 plan=""
for name in "${order[@]}"; do
  [ -n "${estimate[$name]:-}" ] || continue
  case $name in versions|report|selection) ;; *) [[ $steps == *" $name "* ]] || continue ;; esac
  planned=$((planned + estimate[$name])); plan+=" $name ${estimate[$name]}"
done
echo "GPU check$([ "$dry" = 1 ] && echo ' (DRY RUN: CPU, tiny sizes)') into $out"
echo "estimate (s, not a measurement):$plan; total $planned"

step() {  # step NAME COMMAND...: run under its cap, log to OUTDIR/NAME.log, record the result, keep going
  local name=$1; shift
  case $name in versions|report|selection) ;; *) [[ $steps == *" $name "* ]] || return 0 ;; esac
  echo "== $name: $*"
  local start=$SECONDS rc cap=0
  # Never stop the extension's build halfway; the dry run's shell functions cannot run under timeout.
  if [ "$cap_percent" -gt 0 ] && [ "$name" != versions ] && ! declare -F "$1" > /dev/null; then
    cap=$((estimate[$name] * cap_percent / 100)); [ "$cap" -ge 30 ] || cap=30
  fi
  if [ "$cap" -gt 0 ]; then
    timeout --foreground -s INT -k 30 "$cap" "$@" > "$out/$name.log" 2>&1; rc=$?
  else
    "$@" > "$out/$name.log" 2>&1; rc=$?
  fi
  seconds[$name]=$((SECONDS - start))
  case $rc in
    0) result[$name]=passed ;;
    124|137) result[$name]="TIMED OUT (cap $cap s)" ;;
    *) result[$name]="FAILED (exit $rc)" ;;
  esac
  tail -n 3 "$out/$name.log"
  echo "   (${seconds[$name]} s, ${result[$name]})"
}
check_real_selection() {  # dry run: the real selections must collect (test files exist, each -k parses)
  python3 -m pytest --collect-only -q "${pytest_opts[@]}" "${real_tests[@]}" "${tests_k[@]}" &&
    python3 -m pytest --collect-only -q "${pytest_opts[@]}" bench "${bench_k[@]}"
}
dry_bench() {  # one benchmark per bench file, its validation included: the file's first ext case, else its first
  local collected cases
  collected=$(python3 -m pytest bench --collect-only -q "${pytest_opts[@]}") || { echo "$collected"; return 1; }
  mapfile -t cases < <(awk -F:: '
    /::/ { if (!($1 in first)) { first[$1] = $0; files[n++] = $1 }
           if (!($1 in ext) && /[-[]ext[]-]/) ext[$1] = $0 }
    END { for (i = 0; i < n; i++) print (files[i] in ext) ? ext[files[i]] : first[files[i]] }' <<< "$collected")
  python3 -m pytest "${cases[@]}" --benchmark-max-time 0.05 --benchmark-min-rounds 1 --benchmark-only -q \
    "${pytest_opts[@]}" --benchmark-json "$out/bench.json"
}

command -v nvidia-smi > /dev/null &&
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1
step versions python3 -c "import torch, triton, chargpt_kernels; print('torch', torch.__version__, 'triton',
 triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none',
 'backends', chargpt_kernels.available_backends())"
[ "$dry" = 1 ] && step selection check_real_selection
step tests python3 -m pytest "${tests_sel[@]}" -q -ra "${pytest_opts[@]}" --junitxml "$out/tests.xml"
if [ "$dry" = 1 ]; then
  step bench dry_bench
else
  step bench python3 -m pytest "${bench_sel[@]}" --benchmark-only -q --benchmark-json "$out/bench.json"
fi
[ -f "$out/bench.json" ] && step report python3 -m bench.report "$out/bench.json" --out "$out"
step e2e python3 -m bench.e2e "${e2e_flags[@]}"

# The summary: one screen, whatever failed.
last_counts() {  # pytest's last line of counts in log $1, without its === frame
  grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$1" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//'
}
e2e_rates() {  # tokens/s of each variant, from e2e.json
  python3 - "$out/e2e/e2e.json" 2> /dev/null <<'EOF'
import json
import sys
runs = json.load(open(sys.argv[1]))
print(", ".join(f"{name}: {r['tokens_per_sec']:.0f} tok/s" if "tokens_per_sec" in r else f"{name}: failed"
                for name, r in runs.items()))
EOF
}
test_counts() {  # from the junit XML, else pytest's last line
  python3 - "$out/tests.xml" 2> /dev/null <<'EOF' || last_counts "$out/tests.log"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
print(f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
      f"{n['errors']} errors, {n['skipped']} skipped")
EOF
}
echo
echo "==================== GPU check summary$([ "$dry" = 1 ] && echo ' (DRY RUN)') ===================="
failed=()
for name in "${order[@]}"; do
  [ -n "${estimate[$name]:-}" ] || continue
  note=""
  if [ -n "${result[$name]:-}" ]; then
    case $name in
      tests) note=$(test_counts) ;;
      bench) note=$(last_counts "$out/bench.log") ;;
      e2e) note=$(e2e_rates) ;;
    esac
  fi
  printf '%-9s %-22s %5s s  est %4s s  %s\n' "$name" "${result[$name]:-not run}" "${seconds[$name]:--}" \
    "${estimate[$name]}" "$note"
  case ${result[$name]:-} in ""|passed) ;; *) failed+=("$name") ;; esac
done
echo "versions: $(tail -n 1 "$out/versions.log" 2> /dev/null)"
echo "results:  $out (each step's log: $out/<step>.log)"
echo "total:    ${SECONDS} s (estimate $planned s)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU check: FAILED steps: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "GPU check: all steps passed (results in $out)"
