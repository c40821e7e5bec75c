"""End-to-end training runs, eager against fused (and torch.compile), each a real `python -m chargpt.train`.

    python -m bench.e2e --out DIR [--preset gpt] [--iters 500] [--variants eager fused ...] [--rounds 2]
                           [--train-flags "--eval-iters 2"] [--full-fused] [--data PATH]

Every variant trains the same preset for --iters iterations; with --rounds N the variants run N times, alternated
(A B C A B C: a shared machine's drift hits every variant alike), and the best round counts. --full-fused adds one
--fused run of the preset's whole schedule (the validation-loss figure). Writes DIR/e2e.json and DIR/e2e.md: wall
time, tokens/s, best val loss per run, and each run's tokens/s relative to eager.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import cpu_name

VARIANTS = {  # name -> extra chargpt.train flags
    "eager": ["--kernels", "eager"],
    "eager + compile": ["--kernels", "eager", "--compile"],
    "fused": ["--fused"],
    "fused + compile": ["--fused", "--compile"],
    "eager bf16": ["--kernels", "eager", "--dtype", "bfloat16"],  # autocast: on CPU bf16 GEMMs (AMX, AVX512-BF16)
    "fused bf16": ["--fused", "--dtype", "bfloat16"],
}
DEFAULT_VARIANTS = ["eager", "eager + compile", "fused", "fused + compile"]


def train(out_dir, preset, flags, iters, data, extra=()):
    command = [sys.executable, "-m", "chargpt.train", "--preset", preset, "--out-dir", str(out_dir), *flags, *extra]
    if iters:
        command += ["--max-iters", str(iters)]
    if data:
        command += ["--data", data]
    print("$", " ".join(command), flush=True)
    run = subprocess.run(command, capture_output=True, text=True)
    (out_dir.parent / f"{out_dir.name}.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]}
    return json.loads((out_dir / "summary.json").read_text())


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu_name()}, torch {torch.__version__}"


def markdown(results, preset):
    eager = results.get("eager", {}).get("tokens_per_sec")
    lines = [f"Machine: {machine()}. tokens/s leaves out the first (compile/warm-up) step and the evaluations.", "",
             f"| run ({preset}) | iters | wall s | tokens/s | vs eager | best val loss | kernels |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | | | | | failed: {r['error']} |")
            continue
        speedup = f"{r['tokens_per_sec'] / eager:.2f}x" if eager else ""
        lines.append(f"| {name} | {r['iters']} | {r['wall_seconds']:.0f} | {r['tokens_per_sec']:.0f} | {speedup} | "
                     f"{r['best_val_loss']:.4f} | {r['kernels']}{' + compile' if r.get('compile') else ''}, "
                     f"{r.get('dtype', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the runs and the e2e.json/e2e.md summary")
    parser.add_argument("--preset", default="gpt")
    parser.add_argument("--iters", type=int, default=500, help="iterations of each compared variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, alternated")
    parser.add_argument("--train-flags", default="", help="extra chargpt.train flags for every run")
    parser.add_argument("--full-fused", action="store_true", help="also run --fused for the preset's full schedule")
    parser.add_argument("--data", help="corpus path (default: chargpt's tiny shakespeare cache or download)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = args.train_flags.split()
    results = {}
    for round_ in range(args.rounds):
        for name in args.variants:
            run_dir = out / f"{name.replace(' + ', '-').replace(' ', '-')}-{round_}"
            r = train(run_dir, args.preset, VARIANTS[name], args.iters, args.data, extra)
            best = results.get(name)
            if best is None or "error" in best or r.get("tokens_per_sec", 0) > best.get("tokens_per_sec", 0):
                results[name] = r
    if args.full_fused:
        results["fused, full schedule"] = train(out / "fused-full", args.preset, ["--fused"], None, args.data)
    (out / "e2e.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "e2e.md").write_text(markdown(results, args.preset))
    print(markdown(results, args.preset))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
