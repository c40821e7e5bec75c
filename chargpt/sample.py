"""Sample text from a trained chargpt model.

    python -m chargpt.sample --out-dir out --prompt "ROMEO:" --num-samples 2 --max-new-tokens 300

Reads OUT_DIR/best.pt (or ckpt.pt with --checkpoint last). Any kernels backend can sample from a checkpoint
trained with any other: the weights do not depend on the backend.
"""

import sys
from pathlib import Path

import torch

from chargpt import ChargptError
from chargpt.checkpoint import BEST, LAST, load_checkpoint
from chargpt.cli import OneLineParser, resolve_device, run
from chargpt.data import CharTokenizer
from chargpt.kernel_choice import KERNEL_CHOICES, choose_kernels
from chargpt.model import ModelConfig, build_model, kernel_dtypes


def build_parser():
    parser = OneLineParser(prog="python -m chargpt.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="out", help="the training run's folder (out)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="best: the best validation loss (best.pt); last: the latest state (ckpt.pt)")
    parser.add_argument("--prompt", help="text to continue (default: the first character of the vocabulary)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely character")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely characters only")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                        help="backend for attention and LayerNorm (auto: fused when available, else eager)")
    return parser


def sample(args):
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise ChargptError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise ChargptError("--temperature must be >= 0 and --top-k >= 1")
    device = resolve_device(args.device)
    path = Path(args.out_dir) / (BEST if args.checkpoint == "best" else LAST)
    if args.checkpoint == "best" and not path.exists() and (path.parent / LAST).exists():
        path = path.parent / LAST  # a run interrupted before its first evaluation has only ckpt.pt
    checkpoint = load_checkpoint(path)
    tokenizer = CharTokenizer(checkpoint["vocab"])
    prompt = tokenizer.vocab[0] if args.prompt is None else args.prompt
    if not prompt:
        raise ChargptError("--prompt must not be empty")
    unknown = tokenizer.unknown_chars(prompt)
    if unknown:
        raise ChargptError(f"the prompt has characters outside the model's vocabulary: {''.join(unknown)!r}")

    config = ModelConfig(**checkpoint["model_config"])
    choice = choose_kernels(args.kernels, device.type, kernel_dtypes(config, torch.float32))  # no autocast here
    config.kernels = choice.name
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ChargptError(f"{path} does not match its own model configuration: {str(e).splitlines()[0]}") \
            from None
    model.to(device).eval()
    print(f"{path}: iter {checkpoint['iter_num']}, trained with kernels {checkpoint['kernels']}, "
          f"sampling with kernels {choice.describe()} on {device}", file=sys.stderr)
    if choice.note:
        print(choice.note, file=sys.stderr)

    generator = torch.Generator(device).manual_seed(args.seed)
    start = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        ids = model.generate(start, args.max_new_tokens, args.temperature, args.top_k, generator)[0].tolist()
        if i:
            print("---------------")
        print(tokenizer.decode(ids))
    return 0


def main(argv=None):
    return run(sample, build_parser().parse_args(argv), "chargpt.sample")


if __name__ == "__main__":
    sys.exit(main())
