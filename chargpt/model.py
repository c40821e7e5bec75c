"""The models: a bigram baseline and one GPT family whose switches (residual, layernorm, mlp) span the seed's ladder.

The GPT is nanoGPT's: pre-LN blocks, learned positions, weight tying, GPT-2 init, optional biases. Its two hot
ops go through the `chargpt_kernels` seam: attention via `chargpt_kernels.causal_attention` (or
`chargpt_kernels.scaled_dot_product_attention` when decoding one token against a KV cache) and LayerNorm via
`chargpt_kernels.LayerNorm`, on the backend named by `ModelConfig.kernels`. Where that backend has a fused add_norm
kernel, each residual add (with its dropout) and the norm after it run as one `chargpt_kernels.add_norm`
(GPT._trunk_add_norm): same parameters, same arithmetic. Its linear layers call `chargpt_kernels.linear` where the
backend has a fused one (ext on CPU: the GEMV that decoding's single rows need).
ARCH: besides chargpt/kernel_choice.py (the run-level backend choice), this is the only chargpt file that touches
`chargpt_kernels`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import chargpt_kernels
from chargpt import ChargptError
from chargpt_kernels import backends


@dataclass
class ModelConfig:
    arch: str = "gpt"  # "gpt" or "bigram"
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    mlp: bool = True  # a feed-forward sublayer in each block
    residual: bool = True  # sublayers add to the residual stream instead of replacing it
    layernorm: bool = True  # pre-LN before each sublayer and before the head
    init_std: float = 0.02  # normal init of weights and embeddings (GPT-2's 0.02 suits wide residual nets)
    kernels: str = "eager"  # eager | triton | ext | auto


class KVCache:
    """Every layer's keys and values for the tokens seen so far, in buffers of block_size positions allocated at
    the first write: a decoding step writes its token's (k, v) in place and attention reads the filled prefix as a
    strided view, where concatenating onto the cache would copy all of it every step."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.length = 0  # positions filled, the same in every layer; GPT._trunk advances it after all layers
        self._buffers = {}  # attention module -> its (k, v) buffers (B, H, block_size, D)

    def update(self, layer, k, v):
        """Write k, v (B, H, T, D) at positions length .. length + T - 1 of `layer`'s buffers; returns the layer's
        keys and values at positions 0 .. length + T - 1."""
        if layer not in self._buffers:
            B, H, _, D = k.shape
            self._buffers[layer] = tuple(k.new_empty(B, H, self.block_size, D) for _ in range(2))
        k_cache, v_cache = self._buffers[layer]
        end = self.length + k.size(2)
        k_cache[:, :, self.length:end] = k
        v_cache[:, :, self.length:end] = v
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def crop(self, length):
        """Forget every position from `length` on (the next step writes there)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a KV cache of {self.length} positions to {length}")
        self.length = length


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} must be a multiple of n_head {config.n_head}")
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.backend = config.kernels
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, config.bias, config.kernels)
        self.c_proj = Linear(config.n_embd, config.n_embd, config.bias, config.kernels)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, resid_dropout=True):
        """Attention over x (B, T, C). With a KVCache, x's keys and values are written to it; when it already
        holds earlier tokens, x is the next single token and attends to them all.

        resid_dropout=False leaves the output's dropout to the chargpt_kernels.add_norm that adds it to the
        residual stream.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is None or cache.length == 0:
            dropout_p = self.dropout if self.training else 0.0
            y = chargpt_kernels.causal_attention(q, k, v, dropout_p=dropout_p, backend=self.backend)
            if cache is not None:
                cache.update(self, k, v)
        else:
            assert T == 1, "decoding with a KV cache takes one token at a time"
            k, v = cache.update(self, k, v)
            # Every cached key lies in the new token's past, so no causal mask: (Tq=1) x (Tk=cached+1).
            # The backend comes from the chargpt_kernels.use_backend block that GPT.generate opens.
            y = chargpt_kernels.scaled_dot_product_attention(q, k, v, is_causal=False)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return self.resid_dropout(y) if resid_dropout else y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, config.bias, config.kernels)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, config.bias, config.kernels)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, resid_dropout=True):
        y = self.c_proj(F.gelu(self.c_fc(x)))
        return self.dropout(y) if resid_dropout else y


class LayerNorm(chargpt_kernels.LayerNorm):
    """chargpt_kernels.LayerNorm that normalizes in its weight's dtype (float32), as CUDA autocast does for layer_norm.

    Under autocast the residual stream stays float32, but without residual paths a sublayer's bfloat16/float16
    output reaches the next norm, and kernels ops take one dtype for input and weight. Same parameters and keys.
    """

    def forward(self, input):
        return super().forward(input.to(self.weight.dtype))


class Linear(nn.Linear):
    """nn.Linear that calls chargpt_kernels.linear where the model's backend has a fused linear kernel for its input
    (ext on CPU: a multi-threaded GEMV for the single rows of decoding, which torch runs on one thread), else torch's
    own. Same parameters and state_dict keys."""

    def __init__(self, in_features, out_features, bias, backend):
        super().__init__(in_features, out_features, bias=bias)
        self.backend = backend

    def forward(self, x):
        if has_fused_kernel("linear", self.backend, x.device.type, x.dtype):
            return chargpt_kernels.linear(x, self.weight, self.bias, backend=self.backend)
        return super().forward(x)


def layer_norm(config):
    if not config.layernorm:
        return nn.Identity()
    return LayerNorm(config.n_embd, bias=config.bias, backend=config.kernels)


def fuses_residual_norms(config):
    """Whether a GPT of `config` can fold its residual adds into chargpt_kernels.add_norm: pre-LN blocks with residual
    paths and an MLP, where every residual add is followed by a norm. The seed ladder's other rungs cannot."""
    return config.residual and config.layernorm and config.mlp


@torch.compiler.assume_constant_result  # decided once while torch.compile traces, like the seam's own choice
def has_fused_kernel(op, backend, device_type, dtype):
    """Whether `backend` runs `op` (add_norm, linear) on `dtype` tensors of `device_type` with a fused kernel. Only
    then does the model call it: elsewhere it takes its plain path (the residual add and layer_norm; nn.Linear), the
    same arithmetic, and a backend named explicitly that has no such kernel still runs its other kernels."""
    key = op, backend, device_type, dtype
    if key not in _fused_kernels:  # asking the seam costs ~10-30 us, a raise included: once per kind of tensor
        try:
            _fused_kernels[key] = backends.backend_for(backend, op, device_type, dtype) != "eager"
        except TypeError:  # the backend runs here but has no kernel for this op and these tensors
            _fused_kernels[key] = False
    return _fused_kernels[key]


_fused_kernels = {}  # (op, backend, device type, dtype) -> has_fused_kernel's answer


def kernel_dtypes(config, compute_dtype, param_dtype=torch.float32):
    """The dtype each kernels op gets in a model of `config` computing in `compute_dtype` (autocast's dtype, or the
    parameters' when there is no autocast): {op: dtype} for the ops the model uses, so that a run can check before
    its first step that its backend takes them. Attention gets q, k, v from a Linear, so autocast's dtype;
    LayerNorm normalizes in its parameters' dtype (see LayerNorm), and add_norm adds in the residual stream's
    (the embeddings', the parameters' dtype). add_norm is used only where a fused kernel takes it (see
    has_fused_kernel; kernel_choice.OPTIONAL_OPS). Linear layers are left out: they call chargpt_kernels.linear only
    where its GEMV runs (decoding's few rows), and torch's GEMM otherwise. The bigram model uses no kernels op."""
    if config.arch != "gpt":
        return {}
    dtypes = {"attention": compute_dtype}
    if config.layernorm:
        dtypes["layer_norm"] = param_dtype
    if fuses_residual_norms(config):
        dtypes["add_norm"] = param_dtype
    return dtypes


def add_norm(x, residual, norm, dropout_p):
    """(norm(h), h) for h = residual + dropout(x) in one kernels call, `norm` being a LayerNorm module. x, a
    sublayer's output (autocast's dtype), is added in the residual stream's dtype, as `residual + x` would."""
    return chargpt_kernels.add_norm(x.to(residual.dtype), residual, norm.normalized_shape, norm.weight, norm.bias,
                                    norm.eps, dropout_p=dropout_p, backend=norm.backend)


class Block(nn.Module):
    """x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x)); without `residual` each sublayer replaces x instead."""

    def __init__(self, config):
        super().__init__()
        self.residual = config.residual
        self.ln_1 = layer_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = layer_norm(config) if config.mlp else None
        self.mlp = MLP(config) if config.mlp else None

    def forward(self, x, cache=None):
        a = self.attn(self.ln_1(x), cache)
        x = x + a if self.residual else a
        if self.mlp is not None:
            m = self.mlp(self.ln_2(x))
            x = x + m if self.residual else m
        return x

    def forward_add_norm(self, y, x, next_norm, dropout_p, cache=None):
        """forward's arithmetic with each residual add fused with the norm after it: takes y = ln_1(x) along with
        x, and returns (next_norm(x'), x') for the block's output x' (next_norm: the next block's ln_1, or ln_f).
        """
        a = self.attn(y, cache, resid_dropout=False)
        y, x = add_norm(a, x, self.ln_2, dropout_p)
        y, x = add_norm(self.mlp(y, resid_dropout=False), x, next_norm, dropout_p)
        return y, x


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """One token id per row of `logits` (B, V): greedy at temperature 0, else sampled from the top-k softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = layer_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, False, config.kernels)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and un-embeds characters
        # The trunk takes the add_norm path (None) where the backend has a fused add_norm kernel for the residual
        # stream's tensors; True or False forces the add_norm path or the plain one (tests compare the two).
        self.use_add_norm = None
        self.apply(self._init_weights)
        if config.residual:
            # GPT-2: the projections that write into the residual stream shrink with depth, so that the sum of
            # 2 * n_layer of them keeps the stream's variance in check.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """Logits (B, T, V) for idx (B, T), and the mean cross-entropy when `targets` are given."""
        x = self._trunk(idx)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def next_token_logits(self, idx, cache=None):
        """Logits (B, V) for the token after idx, and the KVCache, now covering idx too.

        Without a cache this is a prefill of all of idx into a new one; with it, idx is the single next token.
        """
        cache = KVCache(self.config.block_size) if cache is None else cache
        x = self._trunk(idx, cache)
        return self.lm_head(x[:, -1, :]), cache

    def _trunk(self, idx, cache=None):
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        if self._takes_add_norm(x):
            x = self._trunk_add_norm(x, cache)
        else:
            for block in self.blocks:
                x = block(x, cache)
            x = self.ln_f(x)
        if cache is not None:
            cache.length += T
        return x

    def _takes_add_norm(self, x):
        if not fuses_residual_norms(self.config):
            return False
        if self.use_add_norm is not None:
            return self.use_add_norm
        return has_fused_kernel("add_norm", self.config.kernels, x.device.type, x.dtype)

    def _trunk_add_norm(self, x, cache=None):
        """_trunk's blocks on a fused backend: each residual add, its dropout and the next norm in one add_norm.

        The norm of each block's output is the next block's ln_1 (ln_f after the last), so it is computed where
        the add is, and handed on with the residual stream x.
        """
        dropout_p = self.config.dropout if self.training else 0.0
        next_norms = [block.ln_1 for block in self.blocks[1:]] + [self.ln_f]
        y = self.blocks[0].ln_1(x)
        for block, next_norm in zip(self.blocks, next_norms):
            y, x = block.forward_add_norm(y, x, next_norm, dropout_p, cache)
        return y

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Extend idx (B, T) by `max_new_tokens` sampled characters.

        The KV cache serves while the text fits in block_size. Past that the window slides, every absolute
        position shifts and the cached keys no longer apply, so each step recomputes the last block_size tokens,
        exactly as generation without a cache does.
        """
        block_size = self.config.block_size
        cache = None
        with chargpt_kernels.use_backend(self.config.kernels):
            for _ in range(max_new_tokens):
                if cache is not None and idx.size(1) <= block_size:
                    logits, cache = self.next_token_logits(idx[:, -1:], cache)
                else:
                    logits, cache = self.next_token_logits(idx[:, -block_size:])
                if not use_cache:
                    cache = None
                idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
        return idx


class BigramLanguageModel(nn.Module):
    """Each character predicts the next from a table of logits: the ladder's first rung."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.logits_table = nn.Embedding(config.vocab_size, config.vocab_size)
        nn.init.normal_(self.logits_table.weight, mean=0.0, std=config.init_std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        logits = self.logits_table(idx)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        for _ in range(max_new_tokens):
            logits = self.logits_table(idx[:, -1])
            idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
        return idx


def build_model(config):
    if config.arch == "bigram":
        return BigramLanguageModel(config)
    if config.arch == "gpt":
        return GPT(config)
    raise ChargptError(f"unknown model arch {config.arch!r}; choose gpt or bigram")
