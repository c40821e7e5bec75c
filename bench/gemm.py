"""How far the GPT's matrix products are from what this CPU's GEMMs reach: torch.matmul GFLOP/s in float32 and
bfloat16 at the `gpt` preset's shapes (64 x 256 = 16384 tokens, n_embd 384) and a large square product, each against
the best bf16 rate measured in the same run and, on a CPU with AMX-BF16, the nominal AMX rate (2048 FLOP per cycle
per core at the clock /proc/cpuinfo reports: an ISA figure, not a measurement).

    python -m bench.gemm [--seconds 3] [--out FILE.md]
"""

import argparse
import time

import torch

from bench.common import cpu_name

TOKENS, EMBD = 64 * 256, 384
# (name, m, k, n) of y = x @ w: the forward products of one block and the head (backward: the same sizes twice).
SHAPES = [("qkv", TOKENS, EMBD, 3 * EMBD), ("attn proj", TOKENS, EMBD, EMBD), ("mlp up", TOKENS, EMBD, 4 * EMBD),
          ("mlp down", TOKENS, 4 * EMBD, EMBD), ("lm head", TOKENS, EMBD, 65), ("square 4096", 4096, 4096, 4096)]


def gflops(m, k, n, dtype, seconds=1.0):
    """Best-of GFLOP/s of x (m, k) @ w (k, n), repeated for about `seconds`."""
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((m, k), (k, n)))
    torch.testing.assert_close((x @ w).float(), x.float() @ w.float(), rtol=5e-2, atol=5e-1)  # validate, then time
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        x @ w
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * m * k * n / best / 1e9


def nominal_amx_gflops():
    """2048 bf16 FLOP per cycle (AMX TMUL: 1024 multiply-adds) per thread torch uses, at /proc/cpuinfo's clock;
    None without AMX-BF16. An upper bound: two threads on one physical core share its AMX unit."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if "amx_bf16" not in info:
        return None
    mhz = float(next(line.split(":")[1] for line in info.splitlines() if line.startswith("cpu MHz")))
    return 2048 * mhz / 1e3 * torch.get_num_threads()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent on each product and dtype")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    rows = [(name, m, k, n, gflops(m, k, n, torch.float32, args.seconds), gflops(m, k, n, torch.bfloat16, args.seconds))
            for name, m, k, n in SHAPES]
    best = max(row[5] for row in rows)
    nominal = nominal_amx_gflops()
    lines = [f"Machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads. Best of "
             f"~{args.seconds:g} s.",
             f"Nominal AMX-BF16 rate: {nominal:.0f} GFLOP/s." if nominal else "No AMX-BF16 on this CPU.", "",
             "| product | m x k x n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 | bf16 / best bf16 |"
             + (" bf16 / nominal AMX |" if nominal else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if nominal else "")]
    lines += [f"| {name} | {m} x {k} x {n} | {f32:.0f} | {b16:.0f} | {b16 / f32:.2f}x | {b16 / best:.0%} |"
              + (f" {b16 / nominal:.0%} |" if nominal else "") for name, m, k, n, f32, b16 in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
