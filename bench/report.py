"""Turn a pytest-benchmark JSON file into a markdown table and PNG plots.

    python -m bench.report RESULTS.json [--out DIR]

Writes DIR/<stem>.md (one table per op and mode: median time, throughput, ratio to torch) and, when matplotlib
is installed, DIR/<stem>-<op>.png (each backend's speed-up over its baseline, by shape).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def load_rows(path):
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows.append(dict(info, median_ms=bench["stats"]["median"] * 1e3))
    machine = dict(data.get("machine_info", {}), datetime=data.get("datetime", ""))
    return rows, machine


UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_sec": "tokens/s"}  # extra_info key -> column header


def markdown(rows, machine, device):
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    torch_version = rows[0].get("torch", "?")
    lines = [f"Device: {device} (host CPU {cpu}); torch {torch_version}, python {machine.get('python_version', '?')}; "
             f"measured {machine.get('datetime', '?')[:16]}", ""]
    by_table = defaultdict(list)
    for row in rows:
        by_table[(row["op"], row["mode"])].append(row)
    for (op, mode), table in sorted(by_table.items()):
        unit = next((key for key in UNITS if key in table[0]), None)  # what the case's work was counted in
        baseline = table[0].get("baseline", "torch")
        lines += [f"### {op} {mode}", "",
                  f"| shape | dtype | backend | median ms | {UNITS.get(unit, '')} | speed-up vs {baseline} |",
                  "|---|---|---|---:|---:|---:|"]
        for row in table:
            value = row.get(unit, "")
            ratio = "1.00 (baseline)" if row["backend"] == baseline else (
                f"{row['speedup']:.2f}x" if "speedup" in row else "")
            lines.append(f"| {row['shape']} | {row['dtype']} | {row['backend']} | {row['median_ms']:.3f} | "
                         f"{value} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, out_dir, stem, device):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for op in sorted({r["op"] for r in rows}):
        modes = sorted({r["mode"] for r in rows if r["op"] == op})
        fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            ours = [r for r in rows if r["op"] == op and r["mode"] == mode and "speedup" in r]
            cases = sorted({(r["shape"], r["dtype"]) for r in ours}, key=str)
            backends = sorted({r["backend"] for r in ours})
            width = 0.8 / max(1, len(backends))
            for i, backend in enumerate(backends):
                ratio = {(r["shape"], r["dtype"]): r["speedup"] for r in ours if r["backend"] == backend}
                ax.bar([c + i * width for c in range(len(cases))], [ratio.get(c, 0) for c in cases], width,
                       label=backend)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([c + width * (len(backends) - 1) / 2 for c in range(len(cases))])
            ax.set_xticklabels([f"{s}\n{d}" for s, d in cases], fontsize=7)
            baseline = ours[0]["baseline"] if ours else "baseline"
            ax.set_ylabel(f"speed-up vs {baseline} (higher is better)")
            ax.set_title(f"{op} {mode} on {device}")
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON (pytest bench --benchmark-only --benchmark-json F)")
    parser.add_argument("--out", default="bench/results", help="folder for the markdown and PNG files")
    args = parser.parse_args(argv)
    try:
        rows, machine = load_rows(args.results)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"bench.report: cannot read {args.results}: {err}")
    if not rows:
        sys.exit(f"bench.report: {args.results} holds no benchmark results")
    device = rows[0].get("device", "unknown device")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.results).stem
    (out_dir / f"{stem}.md").write_text(markdown(rows, machine, device))
    for path in [out_dir / f"{stem}.md", *plot(rows, out_dir, stem, device)]:
        print(path)


if __name__ == "__main__":
    main()
