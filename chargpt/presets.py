"""Named runs: a model configuration plus its training hyper-parameters, as plain dataclasses.

The first six reproduce the seed notebook's ladder (seed validation losses in `SEED_VAL_LOSS`): each rung adds one
idea to the previous. `gpt` is nanoGPT's shakespeare-char model, `gpt-cpu` its laptop-sized sibling.
"""

from dataclasses import dataclass, field, replace

from chargpt.model import ModelConfig


@dataclass
class TrainConfig:
    batch_size: int = 64
    max_iters: int = 5000
    learning_rate: float = 1e-3
    decay_lr: bool = True  # linear warm-up, then cosine decay to min_lr at lr_decay_iters; else constant
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters (fix it to split one schedule over several resumed runs)
    min_lr: float = 1e-4
    weight_decay: float = 0.1  # on matrices only (embeddings, linear weights); never on biases and norms
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_interval: int = 250
    eval_iters: int = 200  # batches per split in each evaluation
    log_interval: int = 10  # iterations between metrics.jsonl step records
    seed: int = 1337


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


# The seed's ladder trained every rung with AdamW(lr=1e-3) at torch's defaults: constant rate, no clipping.
_SEED_TRAINING = TrainConfig(batch_size=32, max_iters=5000, decay_lr=False, warmup_iters=0, weight_decay=0.01,
                             beta2=0.999, grad_clip=0.0, eval_interval=500, eval_iters=200)
# Its narrow nets (n_embd 32, most without residual paths or LayerNorm) need weights near 1/sqrt(n_embd) to start
# with: at GPT-2's 0.02 the signal through the stacked small matrices is so faint that within 5000 iterations
# single-head ends 0.15 and residual 0.25 above the seed (measured on this ladder).
_SEED_MODEL = ModelConfig(block_size=8, n_embd=32, n_layer=1, n_head=1, mlp=False, residual=False, layernorm=False,
                          init_std=0.2)

PRESETS = {
    "bigram": Preset(ModelConfig(arch="bigram", block_size=8), replace(_SEED_TRAINING, max_iters=10000)),
    "single-head": Preset(_SEED_MODEL, _SEED_TRAINING),
    "multi-head": Preset(replace(_SEED_MODEL, n_head=4), _SEED_TRAINING),
    "feedforward": Preset(replace(_SEED_MODEL, n_head=4, n_layer=3, mlp=True), _SEED_TRAINING),
    "residual": Preset(replace(_SEED_MODEL, n_head=4, n_layer=3, mlp=True, residual=True), _SEED_TRAINING),
    "layernorm": Preset(replace(_SEED_MODEL, n_head=4, n_layer=3, mlp=True, residual=True, layernorm=True),
                        _SEED_TRAINING),
    "gpt": Preset(ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
                  TrainConfig(batch_size=64, max_iters=5000)),
    # The seed's GPT for a 2-core CPU: the same model, 2000 iterations (the seed notebook's val 1.4968 is at step
    # 2000), evaluations of 20 batches so they do not dominate; run with --device cpu --dtype bfloat16 --fused
    # (about 3.6 s a step on the 2-core Xeon with AMX: some 2 hours).
    "gpt-rung": Preset(ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
                       TrainConfig(batch_size=64, max_iters=2000, eval_iters=20)),
    "gpt-cpu": Preset(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
                      TrainConfig(batch_size=12, max_iters=2000)),
    "tiny": Preset(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1),
                   TrainConfig(batch_size=8, max_iters=40, warmup_iters=5, eval_interval=20, eval_iters=4,
                               log_interval=5)),
}

# Best validation loss of each rung in the seed notebook (and nanoGPT's figures for the full models).
SEED_VAL_LOSS = {"bigram": 2.49, "single-head": 2.41, "multi-head": 2.29, "feedforward": 2.35, "residual": 2.09,
                 "layernorm": 2.06, "gpt": 1.47, "gpt-rung": 1.4968, "gpt-cpu": 1.88}


def get_preset(name):
    """A fresh copy of preset `name`, safe to modify."""
    preset = PRESETS[name]
    return Preset(replace(preset.model), replace(preset.train))
