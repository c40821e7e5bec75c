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
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel

from chargpt import ChargptError
from chargpt.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from chargpt.cli import OneLineParser, resolve_device, run
from chargpt.data import CharTokenizer, Dataset, batch_seed, load_text
from chargpt.distributed import Distributed
from chargpt.kernel_choice import KERNEL_CHOICES, choose_kernels
from chargpt.metrics import MetricsLog, plot_losses
from chargpt.model import ModelConfig, build_model, kernel_dtypes
from chargpt.presets import PRESETS, TrainConfig, get_preset
from chargpt.progress import Progress
from chargpt.rng_state import rng_state, seed_everything, set_rng_state
from chargpt.stop_request import StopRequest
from chargpt.throughput import StepTimeJumps, Throughput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN, VAL = 0, 1  # split ids mixed into batch seeds
# Architecture fields come from the preset (or the checkpoint) and the data, not from flags.
FIXED_MODEL_FIELDS = ("arch", "vocab_size", "kernels")


# ----------------------------------------------------------------------------------------------------------------
# parse

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
    parser.add_argument("--threads", type=int,
                        help=f"CPU threads torch computes with (default: torch's own count, {torch.get_num_threads()} "
                             f"here); 1 is best for small models on a busy machine")
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


def run_config(args, out_dir, device):
    """What this run trains: the preset (or the checkpoint being resumed) with the flags applied on top."""
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
    return SimpleNamespace(checkpoint=checkpoint, preset_name=preset_name, model=model_cfg, train=train_cfg,
                           data_path=data_path, requested_kernels=requested_kernels)


def resolve_dtype(name, device):
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------------------
# set up

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


def train(args):
    started = time.time()
    out_dir = Path(args.out_dir)
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ChargptError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = run_config(args, out_dir, device)
    model_cfg, train_cfg, checkpoint = cfg.model, cfg.train, cfg.checkpoint

    # Data errors come first: they are the most common mistake and the cheapest to report.
    text = load_text(cfg.data_path)
    tokenizer = CharTokenizer(checkpoint["vocab"]) if checkpoint else None
    dataset = Dataset(text, model_cfg.block_size, tokenizer)
    model_cfg.vocab_size = len(dataset.tokenizer)
    dtype = resolve_dtype(args.dtype, device)
    # Every op's backend is checked against the dtype it will get now, not at the first step.
    kernel_choice = choose_kernels(cfg.requested_kernels, device.type, kernel_dtypes(model_cfg, dtype),
                                   require_fused=args.fused)
    model_cfg.kernels = kernel_choice.name

    world = Distributed(device)
    device = world.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(train_cfg.seed + world.rank)

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
    progress = Progress(train_cfg.max_iters, start=iter_num, enabled=world.master)
    metrics = None
    if world.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(metrics_path, resume_at=iter_num if checkpoint else None)
        what = f"resuming {out_dir / LAST} at iter {iter_num}" if checkpoint else "training"
        if kernel_choice.note:
            progress.print(kernel_choice.note)
        progress.print(f"{what}: preset {cfg.preset_name}, {raw_model.num_params() / 1e6:.2f}M parameters, "
                       f"kernels {kernel_choice.describe()}, device {device}, dtype {str(dtype)[6:]}, "
                       f"threads {threads}, world size {world.world_size}, "
                       f"data {cfg.data_path or 'tiny shakespeare'}")

    def log(record):
        if metrics:
            metrics.log(record)

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
                      "kernels": model_cfg.kernels, "preset": cfg.preset_name, "iter_num": iter_num,
                      "best_val_loss": best_val_loss, "data": cfg.data_path}
        if full:
            checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)
        save_checkpoint(checkpoint, out_dir / name)

    def evaluate():
        nonlocal best_val_loss
        losses = estimate_loss(iter_num)
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        log({"kind": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
        progress.print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                       + (" (best)" if improved else ""))
        if improved:
            save(BEST, full=False)
        return losses

    # ------------------------------------------------------------------------------------------------------------
    # loop

    throughput = Throughput(train_cfg.batch_size * model_cfg.block_size * world.world_size, device)
    # Only CPU steps are timed one by one (no sync needed); there a jump means contention for the cores.
    jumps = StepTimeJumps(threads) if device.type == "cpu" else None
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
        step_seconds = throughput.end_step(synced=logging_step or jumps is not None)
        hint = jumps.observe(step_seconds) if jumps is not None and step_seconds is not None else None
        if hint:
            progress.print(hint)
        iter_num += 1
        if logging_step:
            log({"kind": "step", "iter": iter_num - 1, "loss": loss_value, "lr": lr,
                 "tokens_per_sec": throughput.tokens_per_sec()})
            progress.update(iter_num, loss_value, throughput.tokens_per_sec(),
                            throughput.eta(train_cfg.max_iters - iter_num))

    # ------------------------------------------------------------------------------------------------------------
    # save

    throughput.close_window()
    tokens_per_sec = throughput.tokens_per_sec()
    interrupted = iter_num < train_cfg.max_iters
    if not interrupted:
        losses = evaluate()
    save(LAST, full=True)
    progress.close()
    if world.master:
        plot_losses(metrics_path, out_dir / "loss.png")
        summary = {"preset": cfg.preset_name, "iters": iter_num, "best_val_loss": best_val_loss,
                   "final_val_loss": losses["val"] if losses and not interrupted else None,
                   "tokens_per_sec": tokens_per_sec, "wall_seconds": time.time() - started,
                   "kernels": model_cfg.kernels, "kernels_by_op": kernel_choice.by_op, "device": str(device),
                   "dtype": str(dtype)[6:], "threads": threads, "world_size": world.world_size, "compile": args.compile,
                   "params": raw_model.num_params(), "interrupted": interrupted}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    world.close()
    if interrupted:
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
