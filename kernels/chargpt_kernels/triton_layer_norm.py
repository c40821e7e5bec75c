"""The norm family in Triton: LayerNorm, RMSNorm and add_norm (h = residual + dropout(x), y = norm(h)), forward and
backward over the rows of an (M, N) matrix, statistics in fp32. One forward and one backward kernel serve all three:
constexpr flags pick RMS statistics (IS_RMS), the residual add (HAS_RESIDUAL) and its dropout (HAS_DROPOUT).

Forward: each program normalizes a tile of BLOCK_M rows. A row that fits in one BLOCK_N block is read once and
kept in registers; a longer row (N up to 65,536) is swept in column blocks: LayerNorm three times (sum -> mean,
squared deviations -> variance, normalize -> write), RMSNorm twice (squares -> 1/rms, normalize -> write). add_norm
computes h in the first sweep, writes it, and the later sweeps read h back. Mean (LayerNorm) and 1/std are saved for
the backward. h is rounded to its storage dtype before it is normalized, so y is the norm of exactly the h returned.

Backward: with xhat = (h - mean) * rstd (mean = 0 for RMSNorm) and g = dy * w,
    LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))     RMSNorm: dh = rstd * (g - xhat * mean(g * xhat))
    dw = sum_rows dy * xhat,   db = sum_rows dy;   add_norm: dh += dL/dh (h's own gradient), dresidual = dh and
    dx = dh * keep / (1 - p) (without dropout dx is dh: no second tensor is written). With y unused, dh is h's
    own gradient and a small elementwise kernel applies the mask (no 0 * NaN from a norm nobody used).
Each program owns a contiguous group of rows: it writes their dh and its fp32 partial sums of dw and db to row
`program` of a (programs, N) buffer, which is summed afterwards - no atomics, no locks, deterministic. Long rows
take two sweeps per row tile (the two row means, then dh and the partial sums).

Dropout (spec in chargpt_kernels.reference): element (i, j) of x is kept iff tl.rand(seed, i * N + j) >= p, the seed
read from a tensor drawn from torch's generator once per call; the backward regenerates the mask, nothing stores it.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from chargpt_kernels import reference
from chargpt_kernels.triton_compat import fix_interpreter_loop_bounds, refuse_double_backward, wrap_triton

fix_interpreter_loop_bounds()

# CPU means the Triton interpreter, where bfloat16 arithmetic is broken (float16 works).
SUPPORTED_DTYPES = {"cuda": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.float16)}
MAX_N = 65536
MAX_BLOCK_N = 4096  # widest row kept in registers; longer rows are swept in blocks of this size
TILE_ELEMENTS = 4096  # rows per program tile: as many as fill this many elements (short rows share a program)
MAX_BLOCK_M = 64
BACKWARD_PROGRAMS_PER_SM = 4  # enough programs to fill the GPU, few enough that the partial sums stay small
NORMS = ("layer", "rms")


def launch_config(n_rows, n_cols):
    """(BLOCK_M, BLOCK_N, num_warps) for an (n_rows, n_cols) problem; rows fit one block iff n_cols <= BLOCK_N."""
    block_n = min(triton.next_power_of_2(n_cols), MAX_BLOCK_N)
    block_m = max(1, min(TILE_ELEMENTS // block_n, MAX_BLOCK_M, triton.next_power_of_2(n_rows)))
    num_warps = min(max(block_m * block_n // 512, 1), 8)
    return block_m, block_n, num_warps


@triton.jit
def _affine(xhat, W, B, cols, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _load_block(rows_ptr, row_ok, cols, N):
    """(block of the row tile in fp32, zero outside the matrix; its mask) for columns `cols`."""
    mask = row_ok[:, None] & (cols < N)[None, :]
    return tl.load(rows_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _dropout_factor(seed, rows, cols, N, dropout_p, dropout_scale):
    """1 / (1 - p) where the dropout spec keeps element (row, col), i.e. tl.rand(seed, row * N + col) >= p, else 0.

    A factor, not a select: a dropped NaN or inf still gives NaN (NaN * 0), as x * mask / (1 - p) does in torch."""
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    return tl.where(tl.rand(seed, offsets) >= dropout_p, dropout_scale, 0.0)


@triton.jit
def _norm_input(X_rows, R_rows, H, rows, row_ok, cols, N, seed, dropout_p, dropout_scale,
                HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(what is normalized, fp32, zero outside the matrix; the block's mask) for columns `cols` of the row tile:
    x itself, or h = residual + dropout(x) rounded through h's storage dtype (H's element type)."""
    x, mask = _load_block(X_rows, row_ok, cols, N)
    if HAS_RESIDUAL:
        if HAS_DROPOUT:
            x = x * _dropout_factor(seed, rows, cols, N, dropout_p, dropout_scale)
        residual, _ = _load_block(R_rows, row_ok, cols, N)
        x = (residual + x).to(H.dtype.element_ty).to(tl.float32)
    return x, mask


@triton.jit
def _row_shift(X, X_rows, R_rows, H, rows, row_ok, stride_x, N, seed, dropout_p, dropout_scale,
               HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Each row's first normalized element (LayerNorm's shift), fp32: x[:, 0], or h[:, 0] computed exactly as its
    block computes it."""
    if HAS_RESIDUAL:
        first, _ = _norm_input(X_rows, R_rows, H, rows, row_ok, tl.arange(0, 1), N, seed, dropout_p, dropout_scale,
                               HAS_RESIDUAL, HAS_DROPOUT)
        shift = tl.sum(first, 1)
    else:
        shift = tl.load(X + rows.to(tl.int64) * stride_x, mask=row_ok, other=0.0).to(tl.float32)
    return shift


@triton.jit
def _norm_forward(X, R, Y, H, W, B, Mean, Rstd, seed_ptr,
                  stride_x, stride_r, stride_y, stride_h,  # row strides of x, residual, y, h (M, N); columns unit
                  M, N, eps,
                  dropout_p, dropout_scale,  # add_norm's dropout on x: p and 1 / (1 - p)
                  IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (cdiv(M, BLOCK_M),): one (BLOCK_M, BLOCK_N) tile of rows per program; variance from centred values.
    # R and H (residual in, h out) are read and written only with HAS_RESIDUAL, seed_ptr only with HAS_DROPOUT,
    # Mean only for LayerNorm (RMSNorm's "mean" is 0: its statistic is the mean square of h itself).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    X_rows = X + rows.to(tl.int64)[:, None] * stride_x
    Y_rows = Y + rows.to(tl.int64)[:, None] * stride_y
    R_rows, H_rows = R, H
    if HAS_RESIDUAL:
        R_rows = R + rows.to(tl.int64)[:, None] * stride_r
        H_rows = H + rows.to(tl.int64)[:, None] * stride_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # LayerNorm's mean is taken of h - h[0] (shifted data): a constant row sums to exactly 0, so its mean is exactly
    # h[0] and it normalizes to exactly 0 even at eps = 1e-12 (BERT), where an unshifted sum's rounding would be blown
    # up 1e6x.
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not IS_RMS:
        shift = _row_shift(X, X_rows, R_rows, H, rows, row_ok, stride_x, N, seed, dropout_p, dropout_scale,
                           HAS_RESIDUAL, HAS_DROPOUT)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        h, mask = _norm_input(X_rows, R_rows, H, rows, row_ok, cols, N, seed, dropout_p, dropout_scale,
                              HAS_RESIDUAL, HAS_DROPOUT)
        if HAS_RESIDUAL:
            tl.store(H_rows + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
        if not IS_RMS:
            mean = shift + tl.sum(tl.where(mask, h - shift[:, None], 0.0), 1) / N
        centred = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / N + eps)
        y = _affine(centred * rstd[:, None], W, B, cols, cols < N, HAS_WEIGHT, HAS_BIAS)
        tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Sweep 1 reads the inputs (add_norm: computes and writes h); LayerNorm: shifted sum, RMSNorm: squares.
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            h, mask = _norm_input(X_rows, R_rows, H, rows, row_ok, cols, N, seed, dropout_p, dropout_scale,
                                  HAS_RESIDUAL, HAS_DROPOUT)
            if HAS_RESIDUAL:
                tl.store(H_rows + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
            if IS_RMS:
                total += tl.sum(h * h, 1)
            else:
                total += tl.sum(tl.where(mask, h - shift[:, None], 0.0), 1)
        # The later sweeps read h back from memory: the barrier makes the whole program's stores visible to it.
        if HAS_RESIDUAL:
            tl.debug_barrier()
            Src_rows = H_rows
        else:
            Src_rows = X_rows
        if IS_RMS:
            squares = total
        else:
            mean = shift + total / N
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                h, mask = _load_block(Src_rows, row_ok, start + tl.arange(0, BLOCK_N), N)
                centred = tl.where(mask, h - mean[:, None], 0.0)
                squares += tl.sum(centred * centred, 1)
        rstd = 1.0 / tl.sqrt(squares / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            h, mask = _load_block(Src_rows, row_ok, cols, N)
            y = _affine((h - mean[:, None]) * rstd[:, None], W, B, cols, cols < N, HAS_WEIGHT, HAS_BIAS)
            tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _normalized_grads(X_rows, DY_rows, W, mean, rstd, cols, row_ok, N, HAS_WEIGHT: tl.constexpr):
    """xhat, dy and g = dy * w (all fp32, zero outside the matrix) for one column block of a row tile."""
    x, mask = _load_block(X_rows, row_ok, cols, N)
    dy, _ = _load_block(DY_rows, row_ok, cols, N)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return xhat, dy, g


@triton.jit
def _input_grads(g, xhat, rstd, mean_g, mean_g_xhat, DX_rows, GH_rows, DXD_rows, rows, row_ok, cols, N,
                 seed, dropout_p, dropout_scale, IS_RMS: tl.constexpr, HAS_GRAD_H: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr):
    """Store one column block of dx (add_norm: dh = d(norm) + h's own gradient, and x's gradient through the
    dropout mask) from the block's g and xhat and the two row means."""
    if IS_RMS:
        dx = (g - xhat * mean_g_xhat[:, None]) * rstd[:, None]
    else:
        dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
    if HAS_GRAD_H:
        grad_h, _ = _load_block(GH_rows, row_ok, cols, N)
        dx += grad_h
    mask = row_ok[:, None] & (cols < N)[None, :]
    tl.store(DX_rows + cols[None, :], dx.to(DX_rows.dtype.element_ty), mask=mask)
    if HAS_DROPOUT:
        dx_dropped = dx * _dropout_factor(seed, rows, cols, N, dropout_p, dropout_scale)
        tl.store(DXD_rows + cols[None, :], dx_dropped.to(DXD_rows.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial, GH, DXD, seed_ptr,
                   stride_dy, stride_x, stride_dx, stride_gh, stride_dxd,  # row strides (M, N); columns unit
                   M, N, rows_per_program,
                   dropout_p, dropout_scale,  # add_norm's dropout on x: p and 1 / (1 - p)
                   IS_RMS: tl.constexpr, HAS_GRAD_H: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (programs,): program p owns rows [p * rows_per_program, ...) and row p of the partial-sum buffers.
    # X is what the forward normalized (add_norm: h) and DX its gradient (add_norm: dh, also the residual's);
    # GH is h's own upstream gradient (HAS_GRAD_H), DXD x's gradient through the dropout mask (HAS_DROPOUT).
    # One-block rows keep the partial sums in registers; long rows add them to the buffer block by block
    # (only this program touches its buffer row, so no atomics).
    first_row = tl.program_id(0) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    partial_row = tl.program_id(0).to(tl.int64) * N
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        dw_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for row_start in range(first_row, last_row, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < last_row
        X_rows = X + rows.to(tl.int64)[:, None] * stride_x
        DY_rows = DY + rows.to(tl.int64)[:, None] * stride_dy
        DX_rows = DX + rows.to(tl.int64)[:, None] * stride_dx
        GH_rows, DXD_rows = GH, DXD
        if HAS_GRAD_H:
            GH_rows = GH + rows.to(tl.int64)[:, None] * stride_gh
        if HAS_DROPOUT:
            DXD_rows = DXD + rows.to(tl.int64)[:, None] * stride_dxd
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not IS_RMS:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if SINGLE_BLOCK:
            xhat, dy, g = _normalized_grads(X_rows, DY_rows, W, mean, rstd, cols, row_ok, N, HAS_WEIGHT)
            mean_g = tl.sum(g, 1) / N
            mean_g_xhat = tl.sum(g * xhat, 1) / N
            _input_grads(g, xhat, rstd, mean_g, mean_g_xhat, DX_rows, GH_rows, DXD_rows, rows, row_ok, cols, N,
                         seed, dropout_p, dropout_scale, IS_RMS, HAS_GRAD_H, HAS_DROPOUT)
            dw_sum += dy * xhat
            db_sum += dy
        else:
            sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
            sum_g_xhat = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                xhat, dy, g = _normalized_grads(X_rows, DY_rows, W, mean, rstd, start + tl.arange(0, BLOCK_N),
                                                row_ok, N, HAS_WEIGHT)
                sum_g += tl.sum(g, 1)
                sum_g_xhat += tl.sum(g * xhat, 1)
            mean_g = sum_g / N
            mean_g_xhat = sum_g_xhat / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                xhat, dy, g = _normalized_grads(X_rows, DY_rows, W, mean, rstd, cols, row_ok, N, HAS_WEIGHT)
                _input_grads(g, xhat, rstd, mean_g, mean_g_xhat, DX_rows, GH_rows, DXD_rows, rows, row_ok, cols, N,
                             seed, dropout_p, dropout_scale, IS_RMS, HAS_GRAD_H, HAS_DROPOUT)
                if HAS_WEIGHT:
                    dw_ptrs = DW_partial + partial_row + cols
                    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=cols < N) + tl.sum(dy * xhat, 0), mask=cols < N)
                if HAS_BIAS:
                    db_ptrs = DB_partial + partial_row + cols
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=cols < N) + tl.sum(dy, 0), mask=cols < N)
    if SINGLE_BLOCK:
        if HAS_WEIGHT:
            tl.store(DW_partial + partial_row + cols, tl.sum(dw_sum, 0), mask=cols < N)
        if HAS_BIAS:
            tl.store(DB_partial + partial_row + cols, tl.sum(db_sum, 0), mask=cols < N)


@triton.jit
def _dropout_backward(GH, DX, seed_ptr,
                      stride_gh, stride_dx,  # row strides of grad_h and dx (M, N); columns unit
                      M, N,
                      dropout_p, dropout_scale,  # p and 1 / (1 - p)
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): add_norm whose y is unused - x's gradient is h's own through the
    # regenerated dropout mask (the norm contributes nothing, not even 0 * NaN).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    grad_h, mask = _load_block(GH + rows.to(tl.int64)[:, None] * stride_gh, row_ok, cols, N)
    dx = grad_h * _dropout_factor(tl.load(seed_ptr), rows, cols, N, dropout_p, dropout_scale)
    tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def _unit_column_stride(t):
    """Kernels address columns with stride 1; other layouts (rare: a strided slice) are copied once."""
    return t if t is None or t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _dense_vector(t):
    """weight/bias as the kernels read them (unit stride); a strided or expanded one is (N,): cheap to copy."""
    return None if t is None else t.contiguous()


def _new_matrix(like):
    """A contiguous (M, N) tensor of like's dtype: the layout the kernels write."""
    return torch.empty(like.shape, device=like.device, dtype=like.dtype)


def _dropout_args(dropout_p):
    return dropout_p, (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)


def _backward_programs(device, n_rows, block_m):
    """(programs, rows_per_program): a few programs per SM, each owning a whole number of row tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = max(1, min(triton.cdiv(n_rows, block_m), sms * BACKWARD_PROGRAMS_PER_SM))
    rows_per_program = max(1, triton.cdiv(triton.cdiv(n_rows, programs), block_m)) * block_m
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def _forward(x, residual, weight, bias, seed, eps, rms, dropout_p):
    """(y, h, mean, rstd) of one norm over the rows of x (M, N), or of h = residual + dropout(x) when `residual` is
    given; h is None without a residual, mean None for RMSNorm. y and h are contiguous, in x's dtype; mean and rstd
    (M,) float32."""
    x, residual = _unit_column_stride(x), _unit_column_stride(residual)
    weight, bias = _dense_vector(weight), _dense_vector(bias)
    n_rows, n_cols = x.shape
    y = _new_matrix(x)
    h = None if residual is None else _new_matrix(x)
    # No rows, or rows of nothing (launch_config needs N >= 1): empty y and h, statistics that are never read.
    new_stats = torch.zeros if x.numel() == 0 else torch.empty
    mean = None if rms else new_stats((n_rows,), device=x.device, dtype=torch.float32)
    rstd = new_stats((n_rows,), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, h, mean, rstd
    block_m, block_n, num_warps = launch_config(n_rows, n_cols)
    has_dropout = residual is not None and dropout_p > 0.0
    wrap_triton(_norm_forward)[(triton.cdiv(n_rows, block_m),)](
        x, residual, y, h, weight, bias, mean, rstd, seed if has_dropout else None,
        x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), 0 if h is None else h.stride(0),
        n_rows, n_cols, eps, *_dropout_args(dropout_p if has_dropout else 0.0),
        IS_RMS=rms, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SINGLE_BLOCK=n_cols <= block_n,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, h, mean, rstd


def _backward(grad_y, grad_h, x, weight, mean, rstd, has_bias, rms, seed, dropout_p):
    """(dx, dx_dropped, dw, db) for the forward of `_forward` that normalized x (add_norm: h): dx is x's gradient plus
    grad_h when given (add_norm: dh, the residual's gradient); dx_dropped is dx through the dropout mask (None
    without dropout); dw (db) is None without a weight (bias). All in x's dtype; dw and db summed in fp32."""
    grad_y, grad_h, x = _unit_column_stride(grad_y), _unit_column_stride(grad_h), _unit_column_stride(x)
    weight = _dense_vector(weight)
    n_rows, n_cols = x.shape
    has_dropout = dropout_p > 0.0
    dx = _new_matrix(x)
    dx_dropped = _new_matrix(x) if has_dropout else None
    if x.numel() == 0:  # dw and db are sums over no rows (0), or empty when N = 0
        sums = lambda wanted: x.new_zeros((n_cols,)) if wanted else None  # noqa: E731
        return dx, dx_dropped, sums(weight is not None), sums(has_bias)
    block_m, block_n, num_warps = launch_config(n_rows, n_cols)
    single_block = n_cols <= block_n
    programs, rows_per_program = _backward_programs(x.device, n_rows, block_m)
    # Long rows accumulate into the buffer, so it starts at zero; one-block rows write it once.
    new_partial = torch.empty if single_block else torch.zeros
    partial = lambda wanted: (new_partial((programs, n_cols), device=x.device, dtype=torch.float32)  # noqa: E731
                              if wanted else None)
    dw_partial, db_partial = partial(weight is not None), partial(has_bias)
    stride = lambda t: 0 if t is None else t.stride(0)  # noqa: E731
    wrap_triton(_norm_backward)[(programs,)](
        grad_y, x, weight, mean, rstd, dx, dw_partial, db_partial, grad_h, dx_dropped, seed if has_dropout else None,
        grad_y.stride(0), x.stride(0), dx.stride(0), stride(grad_h), stride(dx_dropped),
        n_rows, n_cols, rows_per_program, *_dropout_args(dropout_p),
        IS_RMS=rms, HAS_GRAD_H=grad_h is not None, HAS_DROPOUT=has_dropout,
        HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, SINGLE_BLOCK=single_block,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    reduce = lambda p: None if p is None else p.sum(0).to(x.dtype)  # noqa: E731
    return dx, dx_dropped, reduce(dw_partial), reduce(db_partial)


def _or_empty(t, like):
    """A triton_op returns tensors only: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


def _check_rows(op, x):
    if x.shape[1] > MAX_N:
        raise ValueError(f"triton {op} supports normalized sizes up to {MAX_N}, got {x.shape[1]}")


# --- layer_norm ------------------------------------------------------------------------------------------------------

@torch.library.triton_op("chargpt_triton::layer_norm_forward", mutates_args=())
def layer_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) for x (M, N): y in x's dtype, mean and rstd (M,) float32."""
    y, _, mean, rstd = _forward(x, None, weight, bias, None, eps, False, 0.0)
    return y, mean, rstd


@torch.library.triton_op("chargpt_triton::layer_norm_backward", mutates_args=())
def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                        rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); dw (db) is an empty tensor when there is no weight (bias)."""
    dx, _, dw, db = _backward(grad_y, None, x, weight, mean, rstd, has_bias, False, None, 0.0)
    return dx, _or_empty(dw, x), _or_empty(db, x)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_backward(grad_y, x, weight, mean, rstd, ctx.has_bias)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


layer_norm_forward.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)
refuse_double_backward(layer_norm_backward, "chargpt_triton::layer_norm")


# --- rms_norm --------------------------------------------------------------------------------------------------------

@torch.library.triton_op("chargpt_triton::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for x (M, N): y = x * rstd * weight in x's dtype, rstd = 1 / sqrt(mean(x^2) + eps) (M,) float32."""
    y, _, _, rstd = _forward(x, None, weight, None, None, eps, True, 0.0)
    return y, rstd


@torch.library.triton_op("chargpt_triton::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); dw is an empty tensor when there is no weight."""
    dx, _, dw, _ = _backward(grad_y, None, x, weight, None, rstd, False, True, None, 0.0)
    return dx, _or_empty(dw, x)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(grad_y, x, weight, rstd)
    return dx, (dw if weight is not None else None), None


rms_norm_forward.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)
refuse_double_backward(rms_norm_backward, "chargpt_triton::rms_norm")


# --- add_norm --------------------------------------------------------------------------------------------------------

@torch.library.triton_op("chargpt_triton::add_norm_forward", mutates_args=())
def add_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], eps: float, norm: str,
                     dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd) for x, residual (M, N): h = residual + dropout(x), y = norm(h) ("layer" or "rms"), both
    contiguous in x's dtype; mean (M,) float32 (empty for "rms") and rstd (M,) float32. `seed` (a 1-element int64
    tensor) is required when dropout_p > 0."""
    y, h, mean, rstd = _forward(x, residual, weight, bias, seed, eps, norm == "rms", dropout_p)
    return y, h, _or_empty(mean, rstd), rstd


@torch.library.triton_op("chargpt_triton::add_norm_backward", mutates_args=())
def add_norm_backward(grad_y: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor,
                      weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                      seed: Optional[torch.Tensor], has_bias: bool, norm: str,
                      dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dresidual, dx, dw, db) from the forward's h and statistics; grad_h None means h's output is unused. dx is
    an empty tensor without dropout (x's gradient is then dresidual); dw (db) is empty without a weight (bias)."""
    rms = norm == "rms"
    dh, dx, dw, db = _backward(grad_y, grad_h, h, weight, None if rms else mean, rstd, has_bias, rms, seed, dropout_p)
    return dh, _or_empty(dx, h), _or_empty(dw, h), _or_empty(db, h)


@torch.library.triton_op("chargpt_triton::add_norm_dropout_backward", mutates_args=())
def add_norm_dropout_backward(grad_h: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """x's gradient when only h is used: grad_h (M, N) through the dropout mask of `seed`, contiguous."""
    grad_h = _unit_column_stride(grad_h)
    dx = _new_matrix(grad_h)
    if grad_h.numel() == 0:
        return dx
    n_rows, n_cols = grad_h.shape
    block_m, block_n, num_warps = launch_config(n_rows, n_cols)
    wrap_triton(_dropout_backward)[(triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))](
        grad_h, dx, seed, grad_h.stride(0), dx.stride(0), n_rows, n_cols, *_dropout_args(dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx


def _add_norm_setup_context(ctx, inputs, output):
    _x, _residual, weight, bias, seed, _eps, norm, dropout_p = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd, seed)
    ctx.has_bias, ctx.norm, ctx.dropout_p = bias is not None, norm, dropout_p
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused y or h gets None, not a zero-filled (M, N) gradient to read


def _add_norm_backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    h, weight, mean, rstd, seed = ctx.saved_tensors
    dropout = ctx.dropout_p > 0.0
    if grad_y is None:  # only h is used: the norm adds nothing; weight and bias get no gradient
        dx = add_norm_dropout_backward(grad_h, seed, ctx.dropout_p) if dropout else grad_h
        return dx, grad_h, None, None, None, None, None, None
    dh, dx, dw, db = add_norm_backward(grad_y, grad_h, h, weight, mean, rstd, seed, ctx.has_bias, ctx.norm,
                                       ctx.dropout_p)
    return (dx if dropout else dh), dh, (dw if weight is not None else None), (db if ctx.has_bias else None), \
        None, None, None, None


add_norm_forward.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)
refuse_double_backward(add_norm_backward, "chargpt_triton::add_norm")
refuse_double_backward(add_norm_dropout_backward, "chargpt_triton::add_norm")


# --- backend entry points (see chargpt_kernels.backends): inputs already validated by chargpt_kernels.api ------------

def layer_norm(x, weight, bias, eps):
    """LayerNorm over the rows of x (M, N); weight, bias (N,) or None."""
    _check_rows("layer_norm", x)
    return layer_norm_forward(x, weight, bias, eps)[0]


def rms_norm(x, weight, eps):
    """RMSNorm over the rows of x (M, N): x / sqrt(mean(x^2) + eps) * weight; weight (N,) or None, eps None means
    torch's default (the machine epsilon of x's dtype)."""
    _check_rows("rms_norm", x)
    return rms_norm_forward(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)[0]


def add_norm(x, residual, weight, bias, eps, norm, dropout_p):
    """(y, h): h = residual + dropout(x), y = norm(h) ("layer" or "rms") over the rows of x, residual (M, N).
    The dropout seed is the call's first random draw (chargpt_kernels.reference.new_dropout_seed)."""
    _check_rows("add_norm", x)
    if norm not in NORMS:
        raise ValueError(f"triton add_norm: norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    seed = reference.new_dropout_seed(x.device) if dropout_p > 0.0 else None
    y, h, _, _ = add_norm_forward(x, residual, weight, bias, seed, float(eps), norm, float(dropout_p))
    return y, h
