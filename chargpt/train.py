"""Train a chargpt model.

    python -m chargpt.train                        # gpt on CUDA, gpt-cpu on CPU, tiny shakespeare
    python -m chargpt.train --fused                # attention and LayerNorm on the fused kernels
    python -m chargpt.train --preset layernorm --data my.txt --out-dir out-ln
    torchrun --nproc_per_node=2 -m chargpt.train   # data parallel (gloo on CPU, nccl on CUDA)

Writes OUT_DIR/ckpt.pt (resume state), best.pt (best val weights), metrics.jsonl, loss.png and summary.json.
Ctrl-C saves and stops; --resume continues exactly where the checkpoint left off.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from chargpt import ChargptError
from chargpt.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from chargpt.cli import OneLineParser, resolve_device, run
from chargpt.data import CharTokenizer, Dataset, batch_seed, load_text
from chargpt.model import KERNEL_CHOICES, ModelConfig, build_model, choose_kernels
from chargpt.presets import PRESETS, TrainConfig, get_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN, VAL = 0, 1  # split ids mixed into batch seeds
# Architecture fields come from the preset (or the checkpoint) and the data, not from flags.
FIXED_MODEL_FIELDS = ("arch", "vocab_size", "kernels")


def build_parser():
    parser = OneLineParser(prog="python -m chargpt.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, help="default: gpt on CUDA, gpt-cpu otherwise")
    parser.add_argument("--fused", action="store_true", help="--kernels auto, and stop if no fused backend runs here")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES,
                        help="backend for attention and LayerNorm (default eager; on --resume, the checkpoint's)")
    parser.add_argument("--data", help="a UTF-8 text file to train on (default: tiny shakespeare, downloaded once)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: bfloat16 autocast on CUDA when supported, else float16; float32 on CPU")
    parser.add_argument("--out-dir", default="out", help="where checkpoints, metrics and plots go (out)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    hyper = parser.add_argument_group("hyper-parameters (default: the preset's; on --resume, the checkpoint's)")
    for config_class in (TrainConfig, ModelConfig):
        for f in fields(config_class):
            if f.name in FIXED_MODEL_FIELDS:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool:
                hyper.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
            else:
                hyper.add_argument(flag, type=float if f.type is float else int, default=None)
    return parser


def apply_overrides(args, config):
    """Copy every hyper-parameter flag given on the command line onto `config`."""
    for f in fields(config):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in FIXED_MODEL_FIELDS:
            setattr(config, f.name, value)


def check_config(model_cfg, train_cfg):
    """One clear error for hyper-parameters no run can use (the flags take any number)."""
    for config, names in ((train_cfg, ("batch_size", "eval_interval", "eval_iters", "log_interval")),
                          (model_cfg, ("block_size", "n_layer", "n_head", "n_embd"))):
        for name in names:
            if getattr(config, name) < 1:
                raise ChargptError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if model_cfg.n_embd % model_cfg.n_head:
        raise ChargptError(f"--n-embd {model_cfg.n_embd} must be a multiple of --n-head {model_cfg.n_head}")
    if not 0.0 <= model_cfg.dropout < 1.0:
        raise ChargptError(f"--dropout must be in [0, 1), got {model_cfg.dropout}")
    if train_cfg.max_iters < 0 or train_cfg.learning_rate <= 0:
        raise ChargptError("--max-iters must be >= 0 and --learning-rate > 0")


def learning_rate_at(it, cfg):
    """Linear warm-up to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices (>= 2-D) only: decaying biases and norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


class Distributed:
    """This process's place in a torchrun job (or a single process): rank 0 alone writes files."""

    def __init__(self, device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world_size > 1
        self.device = device
        if self.enabled:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.master = self.rank == 0

    def mean(self, value):
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def any(self, flag):
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self):
        if self.enabled:
            dist.destroy_process_group()


def rng_state(device):
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ProgressBar:
    """One status line: a bar, the loss, tokens/s and the ETA. Redrawn in place on a terminal; elsewhere
    (logs, pipes) printed as a plain line every tenth of the run."""

    def __init__(self, total, start=0, stream=sys.stdout):
        self.total, self.stream = total, stream
        self.interactive = stream.isatty()
        self.next_line_at = start
        self.drawn = False

    def update(self, it, loss, tokens_per_sec, eta_seconds):
        done = it / max(self.total, 1)
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_seconds, 0)))
        line = f"[{bar}] {it}/{self.total} loss {loss:.4f} | {tokens_per_sec / 1e3:.1f}k tok/s | ETA {eta}"
        if self.interactive:
            self.stream.write("\r" + line)
            self.drawn = True
        elif it >= self.next_line_at:
            self.stream.write(line + "\n")
            self.next_line_at = it + max(self.total // 10, 1)
        self.stream.flush()

    def print(self, message):
        """A line of its own (an evaluation, a note) without breaking the bar."""
        if self.drawn:
            self.stream.write("\r\033[K")
        print(message, file=self.stream, flush=True)


class Throughput:
    """Training tokens/s, evaluations and checkpoints left out. The clock is read only after a host sync the loop
    does anyway (a logged loss), so timing never drains the GPU queue; the first step (compilation, warm-up) is
    not counted."""

    def __init__(self, tokens_per_step, device):
        self.tokens_per_step, self.device = tokens_per_step, device
        self.seconds, self.steps = 0.0, 0
        self.window_start, self.window_steps = None, 0
        self.warmed_up = False

    def start_step(self):
        if self.window_start is None:
            self.window_start, self.window_steps = time.perf_counter(), 0

    def end_step(self, synced):
        self.window_steps += 1
        if synced or not self.warmed_up:
            self.close_window()

    def close_window(self):
        if self.window_start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.warmed_up:
            self.seconds += time.perf_counter() - self.window_start
            self.steps += self.window_steps
        self.warmed_up = True
        self.window_start = None

    def tokens_per_sec(self):
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else 0.0

    def eta(self, steps_left):
        return steps_left * self.seconds / self.steps if self.steps else 0.0


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a flag the loop checks between steps, so the state saved is
    consistent; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def plot_losses(metrics_path, png_path):
    """loss.png from metrics.jsonl: the per-step training loss and the periodic train/val estimates."""
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
    ax.set(xlabel="iteration", ylabel="cross-entropy (nats/char)", title=png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def resolve_dtype(name, device):
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


def train(args):
    started = time.time()
    out_dir = Path(args.out_dir)
    device = resolve_device(args.device)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(out_dir / LAST)
        if "optimizer" not in checkpoint:
            raise ChargptError(f"{out_dir / LAST} holds weights only; --resume needs the ckpt.pt a run writes")
        if args.preset and args.preset != checkpoint["preset"]:
            raise ChargptError(f"--resume continues preset {checkpoint['preset']!r} from {out_dir / LAST}; "
                               f"drop --preset {args.preset}")
        preset_name = checkpoint["preset"]
        model_cfg = ModelConfig(**checkpoint["model_config"])
        train_cfg = TrainConfig(**checkpoint["train_config"])
        data_path = str(Path(args.data).resolve()) if args.data else checkpoint["data"]
        requested_kernels = "auto" if args.fused else args.kernels or checkpoint["kernels"]
    else:
        preset_name = args.preset or ("gpt" if device.type == "cuda" else "gpt-cpu")
        preset = get_preset(preset_name)
        model_cfg, train_cfg = preset.model, preset.train
        data_path = args.data and str(Path(args.data).resolve())  # absolute, so --resume works from anywhere
        requested_kernels = "auto" if args.fused else args.kernels or "eager"
    apply_overrides(args, train_cfg)
    apply_overrides(args, model_cfg)
    if train_cfg.lr_decay_iters is None:
        train_cfg.lr_decay_iters = train_cfg.max_iters
    check_config(model_cfg, train_cfg)
    if args.fused and args.kernels not in (None, "auto"):
        raise ChargptError(f"--fused means --kernels auto; it cannot be combined with --kernels {args.kernels}")

    # Data errors come first: they are the most common mistake and the cheapest to report.
    text = load_text(data_path)
    tokenizer = CharTokenizer(checkpoint["vocab"]) if checkpoint else None
    dataset = Dataset(text, model_cfg.block_size, tokenizer)
    model_cfg.vocab_size = len(dataset.tokenizer)
    model_cfg.kernels = choose_kernels(requested_kernels, device.type, require_fused=args.fused)

    world = Distributed(device)
    device = world.device
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(train_cfg.seed + world.rank)
    random.seed(train_cfg.seed + world.rank)
    np.random.seed(train_cfg.seed + world.rank)

    model = build_model(model_cfg).to(device)
    optimizer = make_optimizer(model, train_cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    iter_num, best_val_loss = 0, float("inf")
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ChargptError(f"{out_dir / LAST} does not fit this model: {str(e).splitlines()[0]}") from None
        if checkpoint["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        states = checkpoint["rng"]
        if world.rank < len(states):
            set_rng_state(states[world.rank], device)

    raw_model = model  # what checkpoints and sampling use, whatever wraps it for training
    if args.compile:
        model = torch.compile(model)
    if world.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.amp.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    metrics_path = out_dir / "metrics.jsonl"
    progress = ProgressBar(train_cfg.max_iters, start=iter_num)
    if world.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        keep = []
        if checkpoint and metrics_path.exists():  # drop records past the checkpoint: the resumed run redoes them
            keep = [line for line in metrics_path.read_text().splitlines()
                    if line and json.loads(line)["iter"] < iter_num]
        metrics_path.write_text("".join(line + "\n" for line in keep))
        what = f"resuming {out_dir / LAST} at iter {iter_num}" if checkpoint else "training"
        progress.print(f"{what}: preset {preset_name}, {raw_model.num_params() / 1e6:.2f}M parameters, "
                       f"kernels {model_cfg.kernels}, device {device}, dtype {str(dtype)[6:]}, "
                       f"world size {world.world_size}, data {data_path or 'tiny shakespeare'}")

    def log(record):
        if world.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def estimate_loss(it):
        """Mean loss over eval_iters random batches of each split (seeded by the iteration, so repeatable)."""
        model.eval()
        losses = {}
        for split_id, split in ((TRAIN, "train"), (VAL, "val")):
            total = 0.0
            for k in range(train_cfg.eval_iters):
                x, y = dataset.batch(split, train_cfg.batch_size,
                                     batch_seed(train_cfg.seed, 2 + split_id, it, k, world.rank), device)
                with autocast:
                    _, loss = model(x, y)
                total += loss.item()
            losses[split] = world.mean(total / train_cfg.eval_iters)
        model.train()
        return losses

    def save(name, full):
        """Checkpoint `name`: weights, config and vocab; with `full`, everything a resume needs."""
        rng = world.gather(rng_state(device)) if full else None  # collective: every rank takes part
        if not world.master:
            return
        checkpoint = {"model": raw_model.state_dict(), "model_config": asdict(model_cfg),
                      "train_config": asdict(train_cfg), "vocab": dataset.tokenizer.vocab,
                      "kernels": model_cfg.kernels, "preset": preset_name, "iter_num": iter_num,
                      "best_val_loss": best_val_loss, "data": data_path}
        if full:
            checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)
        save_checkpoint(checkpoint, out_dir / name)

    def evaluate():
        nonlocal best_val_loss
        losses = estimate_loss(iter_num)
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        log({"kind": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
        if world.master:
            progress.print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                           + (" (best)" if improved else ""))
        if improved:
            save(BEST, full=False)
        return losses

    throughput = Throughput(train_cfg.batch_size * model_cfg.block_size * world.world_size, device)
    stop = StopRequest()
    losses = None
    model.train()
    while iter_num < train_cfg.max_iters:
        # Under DDP every rank must stop at the same step; agreeing costs a collective, so only now and then.
        if (not world.enabled or iter_num % train_cfg.log_interval == 0) and world.any(stop.requested):
            break
        if iter_num % train_cfg.eval_interval == 0:
            throughput.close_window()
            losses = evaluate()
            save(LAST, full=True)
        throughput.start_step()
        lr = learning_rate_at(iter_num, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = dataset.batch("train", train_cfg.batch_size,
                             batch_seed(train_cfg.seed, TRAIN, iter_num, world.rank), device)
        with autocast:
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        if train_cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        logging_step = iter_num % train_cfg.log_interval == 0
        if logging_step:
            loss_value = loss.item()  # the only host sync of an ordinary step
        throughput.end_step(synced=logging_step)
        iter_num += 1
        if logging_step:
            log({"kind": "step", "iter": iter_num - 1, "loss": loss_value, "lr": lr,
                 "tokens_per_sec": throughput.tokens_per_sec()})
            if world.master:
                progress.update(iter_num, loss_value, throughput.tokens_per_sec(),
                                throughput.eta(train_cfg.max_iters - iter_num))

    throughput.close_window()
    tokens_per_sec = throughput.tokens_per_sec()
    interrupted = iter_num < train_cfg.max_iters
    if not interrupted:
        losses = evaluate()
    save(LAST, full=True)
    if world.master:
        plot_losses(metrics_path, out_dir / "loss.png")
        summary = {"preset": preset_name, "iters": iter_num, "best_val_loss": best_val_loss,
                   "final_val_loss": losses["val"] if losses and not interrupted else None,
                   "tokens_per_sec": tokens_per_sec, "wall_seconds": time.time() - started,
                   "kernels": model_cfg.kernels, "device": str(device), "dtype": str(dtype)[6:],
                   "world_size": world.world_size, "compile": args.compile, "params": raw_model.num_params(),
                   "interrupted": interrupted}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    world.close()
    if interrupted:
        if world.master:
            progress.print(f"interrupted at iter {iter_num}: saved {out_dir / LAST}; continue with --resume")
        return 130
    if world.master:
        generator = torch.Generator(device).manual_seed(train_cfg.seed)
        start = torch.zeros((1, 1), dtype=torch.long, device=device)
        with autocast:
            sample = raw_model.generate(start, 300, generator=generator)[0].tolist()
        progress.print(f"best val loss {best_val_loss:.4f}, {tokens_per_sec / 1e3:.1f}k tokens/s, "
                       f"{summary['wall_seconds']:.0f}s; sample:\n{dataset.tokenizer.decode(sample)}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(train, args, "chargpt.train")
    except KeyboardInterrupt:
        print("chargpt.train: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
