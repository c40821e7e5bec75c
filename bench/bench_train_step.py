"""Training throughput: tokens/s of one full optimizer step (forward, backward, clip, AdamW) per kernels backend,
against the eager backend in the same run. gpt-cpu on CPU, gpt (bf16 autocast) on CUDA."""

import contextlib
import dataclasses
import math

import pytest
import torch

from bench.common import DEVICE, skip_unless_runnable
from chargpt.model import build_model
from chargpt.presets import get_preset
from chargpt.train import make_optimizer

PRESET = "gpt" if DEVICE == "cuda" else "gpt-cpu"
BACKENDS = ("eager", "torch.compile", "triton", "ext") if DEVICE == "cuda" else ("eager", "ext")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(timed, backend):
    skip_unless_runnable(backend)
    preset = get_preset(PRESET)
    preset.model.kernels = "eager" if backend == "torch.compile" else backend
    torch.manual_seed(0)
    model = build_model(preset.model).to(DEVICE)
    optimizer = make_optimizer(model, preset.train, torch.device(DEVICE))
    forward = torch.compile(model) if backend == "torch.compile" else model
    batch, block = preset.train.batch_size, preset.model.block_size
    x, y = torch.randint(0, preset.model.vocab_size, (2, batch, block), device=DEVICE)
    autocast = torch.autocast(DEVICE, torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check():
        """The backend's loss on the first batch equals the eager model's, dropout off (same weights)."""
        eager = build_model(dataclasses.replace(preset.model, kernels="eager")).to(DEVICE)
        eager.load_state_dict(model.state_dict())
        model.eval()
        with torch.no_grad(), autocast:
            got, want = forward(x, y)[1].item(), eager(x, y)[1].item()
        model.train()
        assert math.isclose(got, want, rel_tol=2e-2 if DEVICE == "cuda" else 1e-5), f"{backend} loss {got} != {want}"

    dtype = "bfloat16 autocast" if DEVICE == "cuda" else "float32"
    info = dict(op="train_step", mode=PRESET, shape=f"batch {batch} x block {block}", dtype=dtype)
    timed(step, f"train_step {PRESET}", backend, info, {"tokens": batch * block}, check, baseline="eager")
