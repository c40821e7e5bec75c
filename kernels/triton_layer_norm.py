"""LayerNorm in Triton: forward and backward over the rows of an (M, N) matrix, statistics in fp32.

Forward: each program normalizes a tile of BLOCK_M rows. A row that fits in one BLOCK_N block is read once and
kept in registers; a longer row (N up to 65,536) is swept in column blocks three times (sum -> mean, squared
deviations -> variance, normalize -> write). Mean and 1/std are saved for the backward.

Backward: with xhat = (x - mean) * rstd and g = dy * w,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   dw = sum_rows dy * xhat,   db = sum_rows dy.
Each program owns a contiguous group of rows: it writes their dx and its fp32 partial sums of dw and db to row
`program` of a (programs, N) buffer, which is summed afterwards - no atomics, no locks, deterministic. Long rows
take two sweeps per row tile (the two row means, then dx and the partial sums).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_compat import fix_interpreter_loop_bounds, refuse_double_backward, wrap_triton

fix_interpreter_loop_bounds()

# CPU means the Triton interpreter, where bfloat16 arithmetic is broken (float16 works).
SUPPORTED_DTYPES = {"cuda": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.float16)}
MAX_N = 65536
MAX_BLOCK_N = 4096  # widest row kept in registers; longer rows are swept in blocks of this size
TILE_ELEMENTS = 4096  # rows per program tile: as many as fill this many elements (short rows share a program)
MAX_BLOCK_M = 64
BACKWARD_PROGRAMS_PER_SM = 4  # enough programs to fill the GPU, few enough that the partial sums stay small


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
def _layer_norm_forward(X, Y, W, B, Mean, Rstd,
                        stride_x, stride_y,  # row strides of x and y (M, N); columns have unit stride
                        M, N, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (cdiv(M, BLOCK_M),): one (BLOCK_M, BLOCK_N) tile of rows per program; variance from centred values.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    X_rows = X + rows.to(tl.int64)[:, None] * stride_x
    Y_rows = Y + rows.to(tl.int64)[:, None] * stride_y
    # The mean is taken of x - x[0] (shifted data): a constant row sums to exactly 0, so its mean is exactly x[0] and
    # it normalizes to exactly 0 even at eps = 1e-12 (BERT), where an unshifted sum's rounding would be blown up 1e6x.
    shift = tl.load(X + rows.to(tl.int64) * stride_x, mask=row_ok, other=0.0).to(tl.float32)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        x, mask = _load_block(X_rows, row_ok, cols, N)
        mean = shift + tl.sum(tl.where(mask, x - shift[:, None], 0.0), 1) / N
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / N + eps)
        y = _affine(centred * rstd[:, None], W, B, cols, cols < N, HAS_WEIGHT, HAS_BIAS)
        tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            x, mask = _load_block(X_rows, row_ok, start + tl.arange(0, BLOCK_N), N)
            total += tl.sum(tl.where(mask, x - shift[:, None], 0.0), 1)
        mean = shift + total / N
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            x, mask = _load_block(X_rows, row_ok, start + tl.arange(0, BLOCK_N), N)
            centred = tl.where(mask, x - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, 1)
        rstd = 1.0 / tl.sqrt(squares / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x, mask = _load_block(X_rows, row_ok, cols, N)
            y = _affine((x - mean[:, None]) * rstd[:, None], W, B, cols, cols < N, HAS_WEIGHT, HAS_BIAS)
            tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
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
def _layer_norm_backward(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial,
                         stride_dy, stride_x, stride_dx,  # row strides of dy, x and dx (M, N); columns unit
                         M, N, rows_per_program,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (programs,): program p owns rows [p * rows_per_program, ...) and row p of the partial-sum buffers.
    # One-block rows keep the partial sums in registers; long rows add them to the buffer block by block
    # (only this program touches its buffer row, so no atomics).
    first_row = tl.program_id(0) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    partial_row = tl.program_id(0).to(tl.int64) * N
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
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if SINGLE_BLOCK:
            xhat, dy, g = _normalized_grads(X_rows, DY_rows, W, mean, rstd, cols, row_ok, N, HAS_WEIGHT)
            mean_g = tl.sum(g, 1) / N
            mean_g_xhat = tl.sum(g * xhat, 1) / N
            dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
            tl.store(DX_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])
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
                dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
                tl.store(DX_rows + cols[None, :], dx.to(DX.dtype.element_ty),
                         mask=row_ok[:, None] & (cols < N)[None, :])
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


def _unit_column_stride(t):
    """Kernels address columns with stride 1; other layouts (rare: a strided slice) are copied once."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _dense_vector(t):
    """weight/bias as the kernels read them (unit stride); a strided or expanded one is (N,): cheap to copy."""
    return None if t is None else t.contiguous()


def _backward_programs(device, n_rows, block_m):
    """(programs, rows_per_program): a few programs per SM, each owning a whole number of row tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = max(1, min(triton.cdiv(n_rows, block_m), sms * BACKWARD_PROGRAMS_PER_SM))
    rows_per_program = max(1, triton.cdiv(triton.cdiv(n_rows, programs), block_m)) * block_m
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


@torch.library.triton_op("chargpt_triton::layer_norm_forward", mutates_args=())
def layer_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) for x (M, N): y in x's dtype, mean and rstd (M,) float32."""
    x, weight, bias = _unit_column_stride(x), _dense_vector(weight), _dense_vector(bias)
    n_rows, n_cols = x.shape
    if x.numel() == 0:  # no rows, or rows of nothing (launch_config needs N >= 1): empty y, unread statistics
        return x.new_empty((n_rows, n_cols)), *(x.new_zeros((n_rows,), dtype=torch.float32) for _ in range(2))
    block_m, block_n, num_warps = launch_config(n_rows, n_cols)
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    mean = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    wrap_triton(_layer_norm_forward)[(triton.cdiv(n_rows, block_m),)](
        x, y, weight, bias, mean, rstd, x.stride(0), y.stride(0), n_rows, n_cols, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SINGLE_BLOCK=n_cols <= block_n,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


@torch.library.triton_op("chargpt_triton::layer_norm_backward", mutates_args=())
def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                        rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); dw (db) is an empty tensor when there is no weight (bias)."""
    grad_y, x, weight = _unit_column_stride(grad_y), _unit_column_stride(x), _dense_vector(weight)
    n_rows, n_cols = x.shape
    if x.numel() == 0:  # dw and db are sums over no rows (0), or empty when N = 0
        sums = lambda wanted: x.new_zeros((n_cols,)) if wanted else x.new_empty(0)  # noqa: E731
        return x.new_empty((n_rows, n_cols)), sums(weight is not None), sums(has_bias)
    block_m, block_n, num_warps = launch_config(n_rows, n_cols)
    single_block = n_cols <= block_n
    programs, rows_per_program = _backward_programs(x.device, n_rows, block_m)
    dx = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    # Long rows accumulate into the buffer, so it starts at zero; one-block rows write it once.
    new_partial = torch.empty if single_block else torch.zeros
    partial = lambda wanted: (new_partial((programs, n_cols), device=x.device, dtype=torch.float32)  # noqa: E731
                              if wanted else None)
    dw_partial, db_partial = partial(weight is not None), partial(has_bias)
    wrap_triton(_layer_norm_backward)[(programs,)](
        grad_y, x, weight, mean, rstd, dx, dw_partial, db_partial, grad_y.stride(0), x.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, SINGLE_BLOCK=single_block,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    reduce = lambda p: x.new_empty(0) if p is None else p.sum(0).to(x.dtype)  # noqa: E731
    return dx, reduce(dw_partial), reduce(db_partial)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_backward(grad_y, x, weight, mean, rstd, ctx.has_bias)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(layer_norm_backward, "chargpt_triton::layer_norm")


def layer_norm(x, weight, bias, eps):
    """Backend entry point (see kernels.backends): x (M, N); weight, bias (N,) or None; already validated."""
    if x.shape[1] > MAX_N:
        raise ValueError(f"triton layer_norm supports normalized sizes up to {MAX_N}, got {x.shape[1]}")
    return layer_norm_forward(x, weight, bias, eps)[0]
