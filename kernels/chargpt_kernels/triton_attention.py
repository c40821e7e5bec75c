"""FlashAttention-2 in Triton: softmax(q k^T * scale) v without ever storing the T x T matrix.

Forward: each program owns BLOCK_M queries of one (batch, head) and sweeps the keys BLOCK_N at a time, keeping
a running row max and row sum (online softmax, fp32, base 2 with log2(e) folded into the scale). It writes the
output and the log-sum-exp (in log2 units) that the backward needs to rebuild the probabilities.

Backward (no atomics): delta = rowsum(dO * O) first, then one kernel where each program owns a key block and
loops over query blocks to accumulate dK and dV, and one where each program owns a query block and loops over
key blocks to accumulate dQ. Both recompute the scores from q and k.

Masking: key blocks entirely in a query block's causal future are never visited (loop bounds); blocks crossing
the diagonal or the sequence ends run a masked variant of the same loop body. The head dim is padded to a power
of two >= 16 (BLOCK_D) with masked loads, so any D <= 256 works. A row with no visible key (every score -inf)
gives 0 output and 0 gradients, as torch does: the running max starts finite and the row's lse is stored as +inf.
Inputs are read through their strides, so the (B, T, H, D) -> (B, H, T, D) transpose views of nanoGPT are never
copied.

attn_mask (bool, True = take part, or additive float) is read through its strides (a (B, 1, 1, Tk) padding mask
broadcast to (B, H, Tq, Tk) has stride 0 on H and Tq, never expanded) and applied to every score tile, forward and
backward; a bool mask replaces removed scores by -inf (as masked_fill), an additive one is added (in log2 units).
GQA: query head h reads key/value head h // GROUP; each dK/dV program owns one key block of one kv head and loops
over its GROUP query heads, so the sum over the group runs in a fixed order, without atomics.

Decoding (flash-decoding): when a kv head's whole query group is a few rows (GQA group x Tq <= DECODE_ROWS, e.g.
one new token against a KV cache), one program takes all of them, so K and V are read once per group, and the keys
are split over several programs to fill the GPU; each split writes its unnormalized output, row max and row sum,
and a second kernel combines the splits into the output and lse the backward reads.

Dropout (spec in chargpt_kernels.reference): the keep-mask of entry (b, h, i, j) is
tl.rand(seed, ((b*H + h)*Tq + i)*Tk + j) >= p, drawn from a seed tensor taken from torch's generator once per forward
call and regenerated - never stored - in both backward kernels.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from chargpt_kernels import reference
from chargpt_kernels.runtime import triton_interpreted
from chargpt_kernels.triton_compat import fix_interpreter_loop_bounds, refuse_double_backward, wrap_triton

fix_interpreter_loop_bounds()

# CPU means the Triton interpreter, where bfloat16 arithmetic is broken (float16 works).
SUPPORTED_DTYPES = {"cuda": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.float16)}
LOG2_E = 1.4426950408889634
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)  # -torch.finfo(torch.float32).max
LOG2_E_JIT = tl.constexpr(LOG2_E)
# Padding and 4-D masks and GQA are fused on every device this backend runs on.
SUPPORTED_FEATURES = {"cuda": ("mask", "gqa"), "cpu": ("mask", "gqa")}


def _configs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


# Autotune candidates per kernel (BLOCK_M = queries per tile, BLOCK_N = keys per tile); `configs_for` prunes them
# by shape. The dK/dV kernel wants many keys per program (it owns them), the others many queries.
FORWARD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (128, 32, 8, 3),
    (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2),
])
DKDV_CONFIGS = _configs([
    (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
    (32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2),
])
DQ_CONFIGS = _configs([
    (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
    (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 4, 2), (32, 32, 4, 2),
])
# float32 uses exact fp32 dots on CUDA cores (TF32 tensor cores would miss torch's float32 accuracy); their
# operands take many more registers, so float32 gets small tiles of its own.
FP32_CONFIGS = {
    "forward": _configs([(16, 32, 8, 2), (32, 16, 8, 2)]),
    "dkdv": _configs([(16, 32, 8, 2), (32, 16, 8, 2)]),
    "dq": _configs([(16, 32, 8, 2)]),
}
DELTA_BLOCK_M = 64
# Decoding: a program's query rows (BLOCK_M, the smallest tl.dot tile) and keys per tile; float32's exact dots
# take half the keys and twice the warps (no spills at D = 256, tests/test_triton_compile.py). Below
# DECODE_MIN_KEYS keys the regular forward serves; a split covers at least DECODE_SPLIT_KEYS keys, and splits are
# added until there are about DECODE_PROGRAMS_PER_SM programs per SM.
DECODE_ROWS = 16
DECODE_CONFIGS = {4: triton.Config({"BLOCK_M": DECODE_ROWS, "BLOCK_N": 32}, num_warps=8, num_stages=2),
                  2: triton.Config({"BLOCK_M": DECODE_ROWS, "BLOCK_N": 64}, num_warps=4, num_stages=2)}
DECODE_MIN_KEYS = 256
DECODE_SPLIT_KEYS = 256
DECODE_PROGRAMS_PER_SM = 2
INTERPRETER_SMS = 4  # under TRITON_INTERPRET=1: enough splits to exercise the combine
# Under TRITON_INTERPRET=1 a single config each; uneven blocks so both masking schemes are exercised on CPU.
INTERPRETER_CONFIGS = {
    "forward": _configs([(64, 32, 4, 1)]),
    "dkdv": _configs([(32, 64, 4, 1)]),
    "dq": _configs([(64, 32, 4, 1)]),
}
CONFIGS = {"forward": FORWARD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
# Pruning budgets, fitted to the register and shared-memory counts that tests/test_triton_compile.py reports
# for sm_90 and sm_80 (it fails on any spill or shared-memory overflow in a shipped config).
# Hopper's wgmma reads its operands from shared memory; sm_80's mma.sync holds them in registers, so there the
# configs at 128 (e.g. forward M=128 N=64 w4, dK/dV M=64 N=64 w4) spill.
MAX_LIVE_FP32_PER_THREAD = {"sm_90+": 128, "older": 120}
MAX_SHARED_MEMORY_BYTES = 160 * 1024
PHILOX_COST = 4  # a score tile under dropout holds about four times the registers (the Philox state)
MASK_COST = 4  # an attn_mask tile: its 64-bit addresses (two registers an entry) and the values


def head_dim_block(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _cost(kernel, config, block_d, element_size, dropout, masked, gqa):
    """(fp32 values live per thread, shared-memory bytes): a rough model of one config's footprint.

    Live values: the fp32 accumulators of the owned rows (dK and dV: two BLOCK_N x BLOCK_D tiles; forward and
    dQ: one BLOCK_M x BLOCK_D tile) plus the BLOCK_M x BLOCK_N score tiles (two in the backward: P and dP) and,
    with an attn_mask, its tile. Under GQA the dK/dV accumulators are carried around the loop over the query group,
    which (measured at sm_90 and sm_80) costs about their size again.
    Shared memory: the owned rows' two input tiles plus num_stages pipelined copies of the two streamed tiles."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    owned, swept = (n, m) if kernel == "dkdv" else (m, n)
    accumulators = (2 if kernel == "dkdv" else 1) * owned * block_d * (2 if gqa and kernel == "dkdv" else 1)
    scores = (1 if kernel == "forward" else 2) * m * n * (PHILOX_COST if dropout else 1) + masked * MASK_COST * m * n
    shared = (2 * owned + 2 * config.num_stages * swept) * block_d * element_size
    return (accumulators + scores) / (32 * config.num_warps), shared


def configs_for(kernel, seq_len, head_dim, element_size, dropout, capability, masked=False, gqa=False):
    """The autotune candidates of `kernel` worth trying for this shape (with an attn_mask when `masked`, several
    query heads per kv head when `gqa`) on compute capability `capability` (e.g. 90 for sm_90; float32:
    FP32_CONFIGS): no tile much longer than the sequence (all padding), none whose estimated registers or shared
    memory overflow (see `_cost`). Never empty: when nothing fits, the config with the fewest live values per
    thread is kept."""
    if triton_interpreted():
        return INTERPRETER_CONFIGS[kernel]
    if element_size == 4:
        return FP32_CONFIGS[kernel]
    block_d = head_dim_block(head_dim)
    longest = max(32, triton.next_power_of_2(seq_len))
    max_live = MAX_LIVE_FP32_PER_THREAD["sm_90+" if capability >= 90 else "older"]
    costs = [(config, *_cost(kernel, config, block_d, element_size, dropout, masked, gqa))
             for config in CONFIGS[kernel]]
    kept = [config for config, live, shared in costs
            if max(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) <= longest
            and live <= max_live and shared <= MAX_SHARED_MEMORY_BYTES]
    return kept or [min(costs, key=lambda cost: cost[1])[0]]


def _capability(device):
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


_autotuners = {}


def _autotuned(kernel_name, kernel, q, seq_len, dropout, masked, gqa):
    """One autotuner per (kernel, sequence-length bucket, head dim, dtype, dropout, mask, GQA, GPU generation): the
    pruned candidates differ by all of these, and bucketing by the next power of two keeps token-by-token sampling
    from re-tuning."""
    capability = 0 if triton_interpreted() else _capability(q.device)
    bucket = triton.next_power_of_2(seq_len)
    key = (kernel_name, bucket, q.shape[-1], q.element_size(), dropout, masked, gqa, capability)
    if key not in _autotuners:
        configs = configs_for(kernel_name, bucket, q.shape[-1], q.element_size(), dropout, capability, masked, gqa)
        _autotuners[key] = triton.autotune(configs, key=["HEAD_DIM", "IS_CAUSAL", "HAS_DROPOUT", "GROUP",
                                                         "MASK_BOOL"])(kernel)
    return _autotuners[key]


@triton.jit
def _program_head(n_rows, H, BLOCK: tl.constexpr):
    """(first row, b, h, b * H + h) of this program. The grid is 1-D (no 65,535 limit on B * H), and the row blocks
    of one head are adjacent, so programs running together share that head's K and V in L2."""
    blocks = tl.cdiv(n_rows, BLOCK)
    bh = tl.program_id(0) // blocks
    return tl.program_id(0) % blocks * BLOCK, (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh


@triton.jit
def _dropout_stream(seed_ptr, bh, T_Q, T_K, HAS_DROPOUT: tl.constexpr):
    """(seed, rng_base): the call's Philox seed and the first offset of head bh in the dropout spec."""
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    return seed, bh.to(tl.int64) * T_Q * T_K


@triton.jit
def _key_ranges(start_m, T_K, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(unmasked_hi, key_hi) for the query block at start_m: keys [0, unmasked_hi) are whole key blocks every query
    of the block sees (no mask); [unmasked_hi, key_hi) cross the diagonal or the T_K tail (masked); keys from key_hi
    on are in the future of every query of the block (never visited)."""
    if IS_CAUSAL:
        key_hi = tl.minimum(T_K, start_m + BLOCK_M)
        unmasked_hi = tl.minimum(start_m, T_K) // BLOCK_N * BLOCK_N
    else:
        key_hi = T_K
        unmasked_hi = T_K // BLOCK_N * BLOCK_N
    return unmasked_hi, key_hi


@triton.jit
def _query_ranges(start_n, T_Q, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(query_lo, diagonal_hi, full_hi) for the key block at start_n: queries before query_lo never see it; query
    blocks [query_lo, diagonal_hi) cross the diagonal (masked); [diagonal_hi, full_hi) see all of it (no mask);
    [max(diagonal_hi, full_hi), T_Q) is the T_Q tail (masked)."""
    if IS_CAUSAL:
        query_lo = start_n // BLOCK_M * BLOCK_M
        diagonal_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, T_Q)
    else:
        query_lo = 0
        diagonal_hi = 0
    return query_lo, diagonal_hi, T_Q // BLOCK_M * BLOCK_M


@triton.jit
def _load_rows(base, rows, cols, stride_row, n_rows, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Tile [rows, cols] of a (n_rows, HEAD_DIM) matrix with unit column stride, zero outside it.

    Row bounds are only checked when MASK_ROWS; the head-dim padding only when BLOCK_D > HEAD_DIM."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_rows(base, tile, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _matmul(a, b, acc):
    """a @ b (+ acc): tensor cores for fp16/bf16; float32 stays exact fp32 (no TF32), like torch's float32 math."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dropout_keep(seed, rng_base, query_index, key_index, T_K, dropout_p):
    """Keep-mask of the dropout spec: tl.rand(seed, rng_base + i * Tk + j) >= p, in int64 offsets."""
    offsets = rng_base + query_index.to(tl.int64) * T_K + key_index
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _visible(query_index, key_index, swept_index, swept_len, IS_CAUSAL: tl.constexpr):
    """Inside the swept sequence and, when causal, not in the future (key j visible to query i iff j <= i).

    Only the swept side needs a bound: rows past the end of the owned side are computed but never stored."""
    visible = swept_index < swept_len
    if IS_CAUSAL:
        visible = visible & (key_index <= query_index)
    return visible


@triton.jit
def _load_mask(Mask_head, query_index, key_index, stride_mm, stride_mn, T_Q, T_K):
    """attn_mask at the (broadcast 2-D) index tiles query_index x key_index, read through its strides; 0 outside."""
    inside = (query_index < T_Q) & (key_index < T_K)
    return tl.load(Mask_head + query_index * stride_mm + key_index * stride_mn, mask=inside, other=0)


@triton.jit
def _with_mask(scores, m, MASK_BOOL: tl.constexpr):
    """Scores (log2 units) under mask values m: a bool mask (as uint8) puts -inf where it removes the key, an
    additive one is added (converted to log2 units)."""
    if MASK_BOOL:
        return tl.where(m != 0, scores, float("-inf"))
    else:
        return scores + m.to(tl.float32) * LOG2_E_JIT


@triton.jit
def _removed(m, MASK_BOOL: tl.constexpr):
    """Where mask values m take the key out entirely (dS is exactly 0 there, as for the causal mask)."""
    if MASK_BOOL:
        return m == 0
    else:
        return m == float("-inf")


# The sweeps take first what differs between their calls: the carried state, the block range [lo, hi) and whether
# it needs masking. The rest (tiles held in registers, the swept matrices, scalars, constexprs) is the same in every
# call of one kernel.

@triton.jit
def _forward_sweep(acc, row_max, row_sum, key_lo, key_hi, MASKED: tl.constexpr,
                   q, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                   Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                   IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # Online softmax over key blocks [key_lo, key_hi): rescale what has been accumulated whenever the row max
    # grows. Dropout zeroes probabilities after they enter the row sum, so the normalizer is the undropped one.
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, offs_n, offs_d, stride_kn, T_K, MASKED, HEAD_DIM, BLOCK_D)
        scores = _matmul(q, tl.trans(k), None) * qk_scale
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], offs_n[None, :], T_K, IS_CAUSAL)
            scores = tl.where(visible, scores, float("-inf"))
        if HAS_MASK:
            m = _load_mask(Mask_head, offs_m[:, None], offs_n[None, :], stride_mm, stride_mn, T_Q, T_K)
            scores = _with_mask(scores, m, MASK_BOOL)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], T_K, dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = _load_rows(V_head, offs_n, offs_d, stride_vn, T_K, MASKED, HEAD_DIM, BLOCK_D)
        acc = _matmul(p.to(v.dtype), v, acc)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _attention_forward(Q, K, V, Out, LSE, Mask, seed_ptr,
                       stride_qb, stride_qh, stride_qm,  # q (B, H, Tq, D): batch, head, row strides; columns unit
                       stride_kb, stride_kh, stride_kn,  # k (B, H / GROUP, Tk, D)
                       stride_vb, stride_vh, stride_vn,  # v (B, H / GROUP, Tk, D)
                       stride_ob, stride_oh, stride_om,  # out (B, H, Tq, D)
                       stride_mb, stride_mh, stride_mm, stride_mn,  # attn_mask (B, H, Tq, Tk), 0 where broadcast
                       H, T_Q, T_K, qk_scale,  # query heads, lengths, scale * log2(e)
                       dropout_p, dropout_scale,  # p and 1 / (1 - p)
                       GROUP: tl.constexpr,  # query heads per key/value head (1: no GQA)
                       IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query blocks) x (B*H). Key blocks below the diagonal and inside T_K run unmasked; the (at most a
    # couple of) blocks on the diagonal or at the T_K tail run masked; blocks in the future are never visited.
    start_m, b, h, bh = _program_head(T_Q, H, BLOCK_M)
    seed, rng_base = _dropout_stream(seed_ptr, bh, T_Q, T_K, HAS_DROPOUT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, T_Q, True, HEAD_DIM, BLOCK_D)
    K_head = K + b * stride_kb + h // GROUP * stride_kh
    V_head = V + b * stride_vb + h // GROUP * stride_vh
    Mask_head = Mask + b * stride_mb + h * stride_mh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The max starts at the lowest finite float, not -inf: nothing changes for finite scores (only -inf is lower),
    # and a row whose scores are all -inf gets p = exp2(-inf - FLOAT32_LOWEST) = 0, not exp2(-inf - -inf) = NaN,
    # with no test in the loop. NaN scores still make p NaN.
    row_max = tl.full([BLOCK_M], FLOAT32_LOWEST, dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    unmasked_hi, key_hi = _key_ranges(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, row_max, row_sum = _forward_sweep(acc, row_max, row_sum, 0, unmasked_hi, False,
                                           q, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                                           Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p,
                                           dropout_scale, IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM,
                                           BLOCK_D, BLOCK_N)
    acc, row_max, row_sum = _forward_sweep(acc, row_max, row_sum, unmasked_hi, key_hi, True,
                                           q, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                                           Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p,
                                           dropout_scale, IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM,
                                           BLOCK_D, BLOCK_N)

    # row_sum is >= 1 once a row has a finite score, 0 for a row whose every visible score is -inf: that row
    # gives 0 (as torch), and lse = +inf makes the backward's exp2(s - lse) = 0 for all its keys.
    # (lse first: row_max is then dead during the output's division, which keeps M=32 N=32 w4 at D=128 unspilled.)
    no_key = row_sum == 0.0
    lse = tl.where(no_key, float("inf"), row_max + tl.log2(tl.where(no_key, 1.0, row_sum)))  # no log2(0) taken
    tl.store(LSE + bh * T_Q + offs_m, lse, mask=offs_m < T_Q)
    _store_rows(Out + b * stride_ob + h * stride_oh, acc / tl.where(no_key, 1.0, row_sum)[:, None], offs_m, offs_d,
                stride_om, T_Q, HEAD_DIM)


@triton.jit
def _attention_decode(Q, K, V, Partial, PartialMax, PartialSum, Mask, seed_ptr,
                      stride_qb, stride_qh, stride_qm,  # q (B, H, Tq, D): batch, head, row strides; columns unit
                      stride_kb, stride_kh, stride_kn,  # k (B, H / GROUP, Tk, D)
                      stride_vb, stride_vh, stride_vn,  # v (B, H / GROUP, Tk, D)
                      stride_mb, stride_mh, stride_mm, stride_mn,  # attn_mask (B, H, Tq, Tk), 0 where broadcast
                      H, T_Q, T_K, qk_scale,  # query heads, lengths, scale * log2(e)
                      dropout_p, dropout_scale,  # p and 1 / (1 - p)
                      split_len, n_rows,  # keys per split (a multiple of BLOCK_N); B * H * Tq
                      GROUP: tl.constexpr,  # query heads per key/value head (1: no GQA)
                      IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                      HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (B * H / GROUP kv heads) x (splits). Row r of a program is query r % Tq of head kv_head * GROUP + r // Tq
    # (GROUP * Tq <= BLOCK_M), against keys [split * split_len, (split + 1) * split_len). Partial* hold, per split,
    # each row's unnormalized output (n_rows x HEAD_DIM), running max and running sum (log2 units).
    splits = tl.cdiv(T_K, split_len)
    split = (tl.program_id(0) % splits).to(tl.int64)
    kv_heads = H // GROUP
    b = (tl.program_id(0) // splits // kv_heads).to(tl.int64)
    kv_head = (tl.program_id(0) // splits % kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    valid = rows < GROUP * T_Q
    h_rows = kv_head * GROUP + tl.where(valid, rows // T_Q, 0)
    offs_m = tl.where(valid, rows % T_Q, T_Q)  # padding rows: a query index past the end (the mask reads 0 there)
    offs_d = tl.arange(0, BLOCK_D)
    inside = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h_rows[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=inside, other=0.0)
    K_head = K + b * stride_kb + kv_head * stride_kh
    V_head = V + b * stride_vb + kv_head * stride_vh
    # Per-row mask bases and dropout streams: the sweep broadcasts them against its key indices.
    Mask_rows = (Mask + b * stride_mb + h_rows * stride_mh)[:, None]
    seed, rng_base = _dropout_stream(seed_ptr, b * H + h_rows, T_Q, T_K, HAS_DROPOUT)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], FLOAT32_LOWEST, dtype=tl.float32)  # as in _attention_forward
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    key_lo = split * split_len
    key_hi = tl.minimum(key_lo + split_len, tl.minimum(T_K, T_Q) if IS_CAUSAL else T_K)  # causal: keys <= i
    unmasked_hi = 0 if IS_CAUSAL else T_K // BLOCK_N * BLOCK_N
    mid = tl.maximum(key_lo, tl.minimum(unmasked_hi, key_hi))
    acc, row_max, row_sum = _forward_sweep(acc, row_max, row_sum, key_lo, mid, False,
                                           q, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                                           Mask_rows, stride_mm, stride_mn, seed, rng_base[:, None], dropout_p,
                                           dropout_scale, IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM,
                                           BLOCK_D, BLOCK_N)
    acc, row_max, row_sum = _forward_sweep(acc, row_max, row_sum, mid, key_hi, True,
                                           q, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                                           Mask_rows, stride_mm, stride_mn, seed, rng_base[:, None], dropout_p,
                                           dropout_scale, IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM,
                                           BLOCK_D, BLOCK_N)
    out_rows = split * n_rows + (b * H + h_rows) * T_Q + offs_m
    tl.store(Partial + out_rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=inside)
    tl.store(PartialMax + out_rows, row_max, mask=valid)
    tl.store(PartialSum + out_rows, row_sum, mask=valid)


@triton.jit
def _attention_decode_combine(Partial, PartialMax, PartialSum, Out, LSE,
                              n_rows, splits,  # B * H * Tq output rows (Out and LSE contiguous); splits written
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # One program per output row: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s, and
    # lse = M + log2(that sum); a split that saw no key (m_s lowest, l_s = 0) adds nothing, and a row with no key
    # at all gets 0 and lse +inf, as in _attention_forward.
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    in_split = offs_s < splits
    maxes = tl.load(PartialMax + offs_s * n_rows + row, mask=in_split, other=float("-inf"))
    top = tl.max(maxes, 0)
    weights = tl.exp2(maxes - top)
    total = tl.sum(weights * tl.load(PartialSum + offs_s * n_rows + row, mask=in_split, other=0.0), 0)
    parts = tl.load(Partial + (offs_s[:, None] * n_rows + row) * HEAD_DIM + offs_d[None, :],
                    mask=in_split[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    acc = tl.sum(parts * weights[:, None], 0)
    no_key = total == 0.0
    tl.store(LSE + row, tl.where(no_key, float("inf"), top + tl.log2(tl.where(no_key, 1.0, total))))
    tl.store(Out + row * HEAD_DIM + offs_d, (acc / tl.where(no_key, 1.0, total)).to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _attention_backward_delta(Out, dOut, Delta,
                              stride_ob, stride_oh, stride_om,  # out (B, H, Tq, D): batch, head, row strides
                              stride_dob, stride_doh, stride_dom,  # dOut (B, H, Tq, D)
                              H, T_Q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO[i, d] * O[i, d] = sum_j P_ij dP_ij: the softmax-backward row term, one row per query.
    start_m, b, h, bh = _program_head(T_Q, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, T_Q, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(dOut + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, T_Q, True, HEAD_DIM,
                    BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _dkdv_sweep(dk, dv, query_lo, query_hi, MASKED: tl.constexpr,
                k, v, offs_n, Q_head, stride_qm, dO_head, stride_dom, LSE_head, Delta_head, T_Q, T_K, qk_scale,
                Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Transposed tiles (keys x queries): P^T = exp2(k q^T * scale - lse), dV += (P*Z)^T dO,
    # dP^T = Z * (v dO^T), dS^T = P^T * (dP^T - delta), dK += dS^T q, with Z = keep / (1 - p) under dropout.
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(query_lo, query_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_head, offs_m, offs_d, stride_qm, T_Q, MASKED, HEAD_DIM, BLOCK_D)
        do = _load_rows(dO_head, offs_m, offs_d, stride_dom, T_Q, MASKED, HEAD_DIM, BLOCK_D)
        if MASKED:
            lse = tl.load(LSE_head + offs_m, mask=offs_m < T_Q, other=0.0)
            delta = tl.load(Delta_head + offs_m, mask=offs_m < T_Q, other=0.0)
        else:
            lse = tl.load(LSE_head + offs_m)
            delta = tl.load(Delta_head + offs_m)
        s_t = _matmul(k, tl.trans(q), None) * qk_scale
        if HAS_MASK:
            m_t = _load_mask(Mask_head, offs_m[None, :], offs_n[:, None], stride_mm, stride_mn, T_Q, T_K)
            s_t = _with_mask(s_t, m_t, MASK_BOOL)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            visible_t = _visible(offs_m[None, :], offs_n[:, None], offs_m[None, :], T_Q, IS_CAUSAL)
            p_t = tl.where(visible_t, p_t, 0.0)
        dp_t = _matmul(v, tl.trans(do), None)
        if HAS_DROPOUT:
            keep_t = _dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], T_K, dropout_p)
            dv = _matmul(tl.where(keep_t, p_t * dropout_scale, 0.0).to(do.dtype), do, dv)
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            dv = _matmul(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (dp_t - delta[None, :])
        if MASKED:  # exactly 0 where masked, also when the row's delta is NaN: a NaN must not reach unseen keys
            ds_t = tl.where(visible_t, ds_t, 0.0)
        if HAS_MASK:
            ds_t = tl.where(_removed(m_t, MASK_BOOL), 0.0, ds_t)
        dk = _matmul(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, b, h, k, v, offs_n, start_n,
               Q, stride_qb, stride_qh, stride_qm, dOut, stride_dob, stride_doh, stride_dom, LSE, Delta,
               Mask, stride_mb, stride_mh, stride_mm, stride_mn, seed_ptr, H, T_Q, T_K, qk_scale,
               dropout_p, dropout_scale,
               IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of one key block accumulated over the query blocks of query head h: the diagonal blocks, the
    blocks that see all of it, the T_Q tail."""
    bh = b * H + h
    seed, rng_base = _dropout_stream(seed_ptr, bh, T_Q, T_K, HAS_DROPOUT)
    Q_head = Q + b * stride_qb + h * stride_qh
    dO_head = dOut + b * stride_dob + h * stride_doh
    LSE_head = LSE + bh * T_Q
    Delta_head = Delta + bh * T_Q
    Mask_head = Mask + b * stride_mb + h * stride_mh
    query_lo, diagonal_hi, full_hi = _query_ranges(start_n, T_Q, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_sweep(dk, dv, query_lo, diagonal_hi, True,
                         k, v, offs_n, Q_head, stride_qm, dO_head, stride_dom, LSE_head, Delta_head, T_Q, T_K,
                         qk_scale, Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                         IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M)
    dk, dv = _dkdv_sweep(dk, dv, diagonal_hi, full_hi, False,
                         k, v, offs_n, Q_head, stride_qm, dO_head, stride_dom, LSE_head, Delta_head, T_Q, T_K,
                         qk_scale, Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                         IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M)
    dk, dv = _dkdv_sweep(dk, dv, tl.maximum(diagonal_hi, full_hi), T_Q, True,
                         k, v, offs_n, Q_head, stride_qm, dO_head, stride_dom, LSE_head, Delta_head, T_Q, T_K,
                         qk_scale, Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                         IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M)
    return dk, dv


@triton.jit
def _attention_backward_dkdv(Q, K, V, dOut, LSE, Delta, dK, dV, Mask, seed_ptr,
                             stride_qb, stride_qh, stride_qm,  # q (B, H, Tq, D): batch, head, row strides
                             stride_kb, stride_kh, stride_kn,  # k (B, H / GROUP, Tk, D)
                             stride_vb, stride_vh, stride_vn,  # v (B, H / GROUP, Tk, D)
                             stride_dob, stride_doh, stride_dom,  # dOut (B, H, Tq, D)
                             stride_mb, stride_mh, stride_mm, stride_mn,  # attn_mask (B, H, Tq, Tk)
                             stride_dkb, stride_dkh, stride_dkn,  # dK (B, H / GROUP, Tk, D)
                             stride_dvb, stride_dvh, stride_dvn,  # dV (B, H / GROUP, Tk, D)
                             H, T_Q, T_K, qk_scale, scale,  # query heads, lengths, scale * log2(e), scale
                             dropout_p, dropout_scale,  # p and 1 / (1 - p)
                             GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                             MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (key blocks) x (B * kv heads): k and v stay in registers while the query blocks of each of the GROUP
    # query heads stream past, in head order. Causal: queries before the key block never see it (skipped); query
    # blocks crossing the diagonal and the T_Q tail run masked.
    start_n, b, h_kv, _ = _program_head(T_K, H // GROUP, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kn, T_K, True, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + b * stride_vb + h_kv * stride_vh, offs_n, offs_d, stride_vn, T_K, True, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if GROUP == 1:  # no loop around the sweeps: a loop-carried dK/dV costs registers (and spills) at sm_90
        dk, dv = _dkdv_head(dk, dv, b, h_kv, k, v, offs_n, start_n,
                            Q, stride_qb, stride_qh, stride_qm, dOut, stride_dob, stride_doh, stride_dom, LSE, Delta,
                            Mask, stride_mb, stride_mh, stride_mm, stride_mn, seed_ptr, H, T_Q, T_K, qk_scale,
                            dropout_p, dropout_scale, IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM,
                            BLOCK_D, BLOCK_M, BLOCK_N)
    else:
        for h in range(h_kv * GROUP, h_kv * GROUP + GROUP):
            dk, dv = _dkdv_head(dk, dv, b, h, k, v, offs_n, start_n,
                                Q, stride_qb, stride_qh, stride_qm, dOut, stride_dob, stride_doh, stride_dom, LSE,
                                Delta, Mask, stride_mb, stride_mh, stride_mm, stride_mn, seed_ptr, H, T_Q, T_K,
                                qk_scale, dropout_p, dropout_scale, IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT,
                                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)

    _store_rows(dK + b * stride_dkb + h_kv * stride_dkh, dk * scale, offs_n, offs_d, stride_dkn, T_K, HEAD_DIM)
    _store_rows(dV + b * stride_dvb + h_kv * stride_dvh, dv, offs_n, offs_d, stride_dvn, T_K, HEAD_DIM)


@triton.jit
def _dq_sweep(dq, key_lo, key_hi, MASKED: tl.constexpr,
              q, do, lse, delta, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
              Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
              IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # P = exp2(q k^T * scale - lse), dP = Z * (dO v^T), dS = P * (dP - delta), dQ += dS k.
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, offs_n, offs_d, stride_kn, T_K, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_rows(V_head, offs_n, offs_d, stride_vn, T_K, MASKED, HEAD_DIM, BLOCK_D)
        s = _matmul(q, tl.trans(k), None) * qk_scale
        if HAS_MASK:
            m = _load_mask(Mask_head, offs_m[:, None], offs_n[None, :], stride_mm, stride_mn, T_Q, T_K)
            s = _with_mask(s, m, MASK_BOOL)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], offs_n[None, :], T_K, IS_CAUSAL), p, 0.0)
        dp = _matmul(do, tl.trans(v), None)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], T_K, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_MASK:
            ds = tl.where(_removed(m, MASK_BOOL), 0.0, ds)
        dq = _matmul(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attention_backward_dq(Q, K, V, dOut, LSE, Delta, dQ, Mask, seed_ptr,
                           stride_qb, stride_qh, stride_qm,  # q (B, H, Tq, D): batch, head, row strides
                           stride_kb, stride_kh, stride_kn,  # k (B, H / GROUP, Tk, D)
                           stride_vb, stride_vh, stride_vn,  # v (B, H / GROUP, Tk, D)
                           stride_dob, stride_doh, stride_dom,  # dOut (B, H, Tq, D)
                           stride_mb, stride_mh, stride_mm, stride_mn,  # attn_mask (B, H, Tq, Tk)
                           stride_dqb, stride_dqh, stride_dqm,  # dQ (B, H, Tq, D)
                           H, T_Q, T_K, qk_scale, scale,  # query heads, lengths, scale * log2(e), scale
                           dropout_p, dropout_scale,  # p and 1 / (1 - p)
                           GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                           MASK_BOOL: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query blocks) x (B*H): the forward's loop structure, with q, dO, lse and delta held in registers.
    start_m, b, h, bh = _program_head(T_Q, H, BLOCK_M)
    seed, rng_base = _dropout_stream(seed_ptr, bh, T_Q, T_K, HAS_DROPOUT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, T_Q, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(dOut + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, T_Q, True, HEAD_DIM,
                    BLOCK_D)
    lse = tl.load(LSE + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0)
    delta = tl.load(Delta + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0)
    K_head = K + b * stride_kb + h // GROUP * stride_kh
    V_head = V + b * stride_vb + h // GROUP * stride_vh
    Mask_head = Mask + b * stride_mb + h * stride_mh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    unmasked_hi, key_hi = _key_ranges(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_sweep(dq, 0, unmasked_hi, False,
                   q, do, lse, delta, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                   Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                   IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N)
    dq = _dq_sweep(dq, unmasked_hi, key_hi, True,
                   q, do, lse, delta, offs_m, K_head, stride_kn, V_head, stride_vn, T_Q, T_K, qk_scale,
                   Mask_head, stride_mm, stride_mn, seed, rng_base, dropout_p, dropout_scale,
                   IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N)
    _store_rows(dQ + b * stride_dqb + h * stride_dqh, dq * scale, offs_m, offs_d, stride_dqm, T_Q, HEAD_DIM)


def _unit_last_stride(t):
    """Kernels address the head dim with stride 1; anything else (rare) is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_like(t):
    """A contiguous tensor of t's shape: the layout the kernels write. empty_like would keep t's layout, which for
    overlapping or expanded inputs has no unit last stride or no distinct rows (and differs between fake and real
    tensors for some size-1 dims)."""
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


def _bht_strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _group(q, k):
    """Query heads per key/value head (1 without GQA, and for zero heads)."""
    return q.shape[1] // k.shape[1] if k.shape[1] else 1


def _dropout_args(dropout_p):
    return dropout_p, (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)


def _mask_args(mask, q):
    """(tensor, strides, HAS_MASK, MASK_BOOL) for the kernels: a bool mask is read as uint8 (same bytes); no mask
    passes q as a never-read placeholder."""
    if mask is None:
        return q, (0, 0, 0, 0), False, False
    is_bool = mask.dtype == torch.bool
    return (mask.view(torch.uint8) if is_bool else mask), tuple(mask.stride()), True, is_bool


def _sm_count(device):
    if triton_interpreted():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(programs, t_k, block_n, sms):
    """(splits, keys per split) for `programs` (batch x kv heads) decode programs over t_k keys: enough splits
    for about DECODE_PROGRAMS_PER_SM programs per SM, none shorter than DECODE_SPLIT_KEYS keys, each a whole
    number of key tiles."""
    wanted = max(1, min(triton.cdiv(DECODE_PROGRAMS_PER_SM * sms, max(programs, 1)), t_k // DECODE_SPLIT_KEYS))
    split_len = triton.cdiv(triton.cdiv(t_k, wanted), block_n) * block_n
    return triton.cdiv(t_k, split_len), split_len


def _decode(q, k, v, out, lse, seed, mask_t, mask_strides, has_mask, mask_bool, is_causal, dropout_p, scale):
    """attention_forward for a few query rows per kv head: split-KV programs, then the combine (out, lse)."""
    batch, heads, t_q, head_dim = q.shape
    t_k, group = k.shape[2], _group(q, k)
    config = DECODE_CONFIGS[4 if q.element_size() == 4 else 2]
    block_n = config.kwargs["BLOCK_N"]
    splits, split_len = decode_splits(batch * k.shape[1], t_k, block_n, _sm_count(q.device))
    n_rows = batch * heads * t_q
    partial = torch.empty((splits, n_rows, head_dim), device=q.device, dtype=torch.float32)
    partial_max = torch.empty((splits, n_rows), device=q.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    wrap_triton(_attention_decode)[(batch * k.shape[1] * splits,)](
        q, k, v, partial, partial_max, partial_sum, mask_t, seed, *_bht_strides(q), *_bht_strides(k),
        *_bht_strides(v), *mask_strides, heads, t_q, t_k, scale * LOG2_E, *_dropout_args(dropout_p), split_len,
        n_rows, GROUP=group, IS_CAUSAL=is_causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
        HAS_DROPOUT=dropout_p > 0.0, HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), **config.kwargs,
        num_warps=config.num_warps, num_stages=config.num_stages)
    wrap_triton(_attention_decode_combine)[(n_rows,)](
        partial, partial_max, partial_sum, out, lse, n_rows, splits, HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim), BLOCK_S=triton.next_power_of_2(splits))


@torch.library.triton_op("chargpt_triton::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], is_causal: bool, dropout_p: float,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for q (B, H, Tq, D), k and v (B, H / GROUP, Tk, D): out contiguous, of q's shape and dtype; lse
    (B, H, Tq) float32 in log2 units. `mask` is None or a (B, H, Tq, Tk) view; `seed` is required when
    dropout_p > 0."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    batch, heads, t_q, head_dim = q.shape
    t_k = k.shape[2]
    out = _new_like(q)
    lse = torch.empty((batch, heads, t_q), device=q.device, dtype=torch.float32)
    mask_t, mask_strides, has_mask, mask_bool = _mask_args(mask, q)
    if 0 < _group(q, k) * t_q <= DECODE_ROWS and t_k >= DECODE_MIN_KEYS:
        _decode(q, k, v, out, lse, seed, mask_t, mask_strides, has_mask, mask_bool, is_causal, dropout_p, scale)
        return out, lse
    kernel = _autotuned("forward", _attention_forward, q, max(t_q, t_k), dropout_p > 0.0, has_mask,
                        _group(q, k) > 1)
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, out, lse, mask_t, seed, *_bht_strides(q), *_bht_strides(k), *_bht_strides(v), *_bht_strides(out),
        *mask_strides, heads, t_q, t_k, scale * LOG2_E, *_dropout_args(dropout_p), GROUP=_group(q, k),
        IS_CAUSAL=is_causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool, HAS_DROPOUT=dropout_p > 0.0,
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim))
    return out, lse


@torch.library.triton_op("chargpt_triton::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, seed: Optional[torch.Tensor],
                       mask: Optional[torch.Tensor], is_causal: bool, dropout_p: float,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's out and lse; the dropout mask is regenerated from the same seed. dk and dv
    sum over each kv head's query group."""
    grad_out, q, k, v, out = (_unit_last_stride(t) for t in (grad_out, q, k, v, out))
    batch, heads, t_q, head_dim = q.shape
    t_k, kv_heads = k.shape[2], k.shape[1]
    block_d = head_dim_block(head_dim)
    delta = torch.empty_like(lse)
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)  # of expanded inputs too: autograd sums them
    wrap_triton(_attention_backward_delta)[(triton.cdiv(t_q, DELTA_BLOCK_M) * batch * heads,)](
        out, grad_out, delta, *_bht_strides(out), *_bht_strides(grad_out), heads, t_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M)

    mask_t, mask_strides, has_mask, mask_bool = _mask_args(mask, q)
    common = dict(GROUP=_group(q, k), IS_CAUSAL=is_causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
                  HAS_DROPOUT=dropout_p > 0.0,
                  HEAD_DIM=head_dim, BLOCK_D=block_d)
    scalars = (heads, t_q, t_k, scale * LOG2_E, scale, *_dropout_args(dropout_p))
    inputs = (*_bht_strides(q), *_bht_strides(k), *_bht_strides(v), *_bht_strides(grad_out), *mask_strides)
    dkdv = _autotuned("dkdv", _attention_backward_dkdv, q, max(t_q, t_k), dropout_p > 0.0, has_mask,
                      _group(q, k) > 1)
    grid = lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]) * batch * kv_heads,)  # noqa: E731
    wrap_triton(dkdv)[grid](
        q, k, v, grad_out, lse, delta, dk, dv, mask_t, seed, *inputs, *_bht_strides(dk), *_bht_strides(dv),
        *scalars, **common)
    dq_kernel = _autotuned("dq", _attention_backward_dq, q, max(t_q, t_k), dropout_p > 0.0, has_mask,
                           _group(q, k) > 1)
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    wrap_triton(dq_kernel)[grid](
        q, k, v, grad_out, lse, delta, dq, mask_t, seed, *inputs, *_bht_strides(dq), *scalars, **common)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, seed, mask, is_causal, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed, mask)
    ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, seed, mask = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, seed, mask, ctx.is_causal, ctx.dropout_p,
                                    ctx.scale)
    return dq, dk, dv, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(attention_backward, "chargpt_triton::attention")


def attention(q, k, v, is_causal, dropout_p, scale, attn_mask=None):
    """Backend entry point (see chargpt_kernels.backends): q (B, H, Tq, D), k and v (B, H / GROUP, Tk, D), attn_mask
    None or a (B, H, Tq, Tk) view, already validated."""
    seed = reference.new_dropout_seed(q.device) if dropout_p > 0.0 else None
    return attention_forward(q, k, v, seed, attn_mask, bool(is_causal), float(dropout_p), float(scale))[0]
