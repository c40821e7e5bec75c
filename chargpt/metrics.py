"""OUT_DIR/metrics.jsonl (a JSON record per line: step losses and train/val evaluations) and loss.png drawn from it."""

import json
from pathlib import Path


class MetricsLog:
    """Appends records to metrics.jsonl. Only the writing process (rank 0) opens one."""

    def __init__(self, path, resume_at=None):
        """Start the file afresh, or on a resume at iteration `resume_at` keep only the records before it: the
        resumed run redoes the rest."""
        self.path = Path(path)
        keep = []
        if resume_at is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["iter"] < resume_at]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path, png_path):
    """loss.png from metrics.jsonl: the per-step training loss and the periodic train/val estimates. Nothing
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.5, label="batch loss")
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="iteration", ylabel="cross-entropy (nats/char)", title=Path(png_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
