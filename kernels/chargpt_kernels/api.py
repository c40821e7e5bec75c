"""The public ops: validate the request once, then hand it to the backend `chargpt_kernels.backends` picks."""

import math
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from chargpt_kernels import backends, reference

MAX_HEAD_DIM = 256
# Held at import, so the fallback still reaches torch after a user swaps F.scaled_dot_product_attention for ours.
_torch_sdpa = F.scaled_dot_product_attention
_warned = set()  # fallback reasons already warned about: a fixed set of sentences, so it cannot grow


def _check_float_tensors(op, **tensors):
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}")


def _float_tensors_ok(first, *others):
    """Cheap test that `_check_float_tensors` would pass for these tensors (others may hold None: skipped)."""
    if not (isinstance(first, torch.Tensor) and first.is_floating_point()):
        return False
    dtype, device = first.dtype, first.device
    return all(t is None or (isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == device)
               for t in others)


# The one accept-rule of the fused attention: (test, why torch's sdpa is used instead, what exactly is wrong), each
# test taking (q, k, v, dropout_p, scale, gqa). `causal_attention` raises the detail of the first failed test;
# `scaled_dot_product_attention` falls back to torch and warns once per reason (reasons never name shapes, so
# decoding token by token warns once, not once per step).
_ATTENTION_RULES = (
    (lambda q, k, v, p, s, g: q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
     "only 4-D (B, H, T, D) inputs are fused",
     lambda q, k, v, p, s, g: f"q, k, v must be 4-D (B, H, T, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"),
    (lambda q, k, v, p, s, g: k.shape == v.shape and q.shape[-1] == k.shape[-1],
     "a value head dim unlike the query's is not fused",
     lambda q, k, v, p, s, g: f"k and v must have the same shape and q k's head dim, got q {tuple(q.shape)}, "
                              f"k {tuple(k.shape)}, v {tuple(v.shape)}"),
    (lambda q, k, v, p, s, g: q.shape[0] == k.shape[0], "broadcasting the batch dim is not fused",
     lambda q, k, v, p, s, g: f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B"),
    (lambda q, k, v, p, s, g: q.shape[1] == k.shape[1] or (g and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0),
     "query and key head counts that differ without enable_gqa are not fused",
     lambda q, k, v, p, s, g: f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in H"
                              + (", or H of q be a multiple of k's" if g else " (or pass enable_gqa=True)")),
    (lambda q, k, v, p, s, g: 1 <= q.shape[-1] <= MAX_HEAD_DIM, f"head dims of 0 or over {MAX_HEAD_DIM} are not fused",
     lambda q, k, v, p, s, g: f"head dim D must be in [1, {MAX_HEAD_DIM}], got {q.shape[-1]}"),
    (lambda q, k, v, p, s, g: isinstance(p, (int, float)) and 0.0 <= p < 1.0,
     "dropout_p outside [0, 1) is not fused",
     lambda q, k, v, p, s, g: f"dropout_p must be in [0, 1), got {p!r}"),
    (lambda q, k, v, p, s, g: s is None or (isinstance(s, (int, float)) and math.isfinite(s)),
     "a non-finite scale is not fused",
     lambda q, k, v, p, s, g: f"scale must be a finite number or None, got {s!r}"),
)
# What each optional feature is called when no fused backend takes it here (the fallback warning's reason).
_FEATURE_REASONS = {"mask": "attn_mask is not fused on this backend and device",
                    "gqa": "GQA (fewer key/value heads) is not fused on this backend and device"}


def _attention_refusal(q, k, v, dropout_p, scale, gqa=False):
    """None when the fused kernels take this (validated float tensors) request, else (reason, detail)."""
    for accepts, reason, detail in _ATTENTION_RULES:
        if not accepts(q, k, v, dropout_p, scale, gqa):
            return reason, detail(q, k, v, dropout_p, scale, gqa)
    return None


def _mask_refusal(mask, q, k):
    """None when `mask` can be fused for (B, Hq, Tq, Tk) attention, else (reason, detail)."""
    if not isinstance(mask, torch.Tensor):
        return "a non-tensor attn_mask is not fused", f"attn_mask must be a tensor, got {type(mask).__name__}"
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        return ("an attn_mask of another dtype is not fused",
                f"attn_mask must be bool or {q.dtype} (q's dtype), got {mask.dtype}")
    if mask.device != q.device:
        return "an attn_mask on another device is not fused", f"attn_mask is on {mask.device} but q on {q.device}"
    if mask.requires_grad:
        return "an attn_mask that requires grad is not fused", "attn_mask must not require grad"
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        if mask.dim() > 4 or torch.broadcast_shapes(mask.shape, full) != full:
            raise RuntimeError
    except RuntimeError:
        return ("an attn_mask that does not broadcast to (B, H, Tq, Tk) is not fused",
                f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Tq, Tk) = {full}")
    return None


def _is_empty(*tensors):
    return any(t.numel() == 0 for t in tensors)


def _empty_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """sdpa of inputs with no elements, computed here: torch 2.11's CPU sdpa divides by zero at H = 0 (SIGFPE, the
    process dies). torch still judges the call, on meta tensors (same errors, same output shape); the composed
    reference then gives the empty or zero result (no keys: 0 rows), differentiably."""
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
    key_m, value_m = meta(key), meta(value)
    hq, hk = (query.shape[-3], key.shape[-3]) if query.dim() >= 3 and key.dim() >= 3 else (1, 1)
    if enable_gqa and 0 < hk != hq and hq % hk == 0:  # torch 2.8-2.11's meta sdpa does not broadcast GQA heads
        key_m, value_m = key_m.repeat_interleave(hq // hk, -3), value_m.repeat_interleave(hq // hk, -3)
    _torch_sdpa(meta(query), key_m, value_m, attn_mask=meta(attn_mask), dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=enable_gqa)
    if scale is None and query.shape[-1] == 0:
        scale = 1.0  # no query features: every score is 0 whatever the scale (1/sqrt(0) would raise)
    return reference.attention(query, key, value, bool(is_causal), dropout_p, scale, attn_mask)


def _needs(mask, q, k):
    return (("mask",) if mask is not None else ()) + (("gqa",) if q.shape[1] != k.shape[1] else ())


def _window_mask(tq, tk, window, device):
    """(Tq, Tk) bool: True where key j lies among the `window` most recent positions of query i (j > i - window)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1 - window)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     scale: Optional[float] = None, backend: Optional[str] = None,
                     attn_mask: Optional[torch.Tensor] = None, enable_gqa: bool = False,
                     window: Optional[int] = None) -> torch.Tensor:
    """Causal softmax(q k^T * scale + mask) v on a fused backend; raises on anything the kernels do not take.

    Arguments:
        q: (B, Hq, Tq, D) float tensor; k, v: (B, Hk, Tk, D), same dtype and device. Any strides; D <= 256.
        dropout_p: dropout on the attention weights, in [0, 1), drawn inside the kernel from torch's RNG
            (chargpt_kernels.reference states the mask: same seed, same mask).
        scale: multiplies q k^T; None means 1/sqrt(D). Any finite number.
        backend: eager, triton, ext or auto; None means the current one (`chargpt_kernels.use_backend`).
        attn_mask: None, or bool (True = take part) / additive float of q's dtype, broadcastable to
            (B, Hq, Tq, Tk) (e.g. (B, 1, 1, Tk) key padding), combined with the causal mask. Read through its
            strides: broadcast dims are never expanded in memory.
        enable_gqa: allow Hk < Hq (Hq a multiple of Hk): query head h uses key/value head h // (Hq / Hk).
        window: sliding-window attention: query i sees only keys i - window < j <= i (itself and the window - 1
            before it), as Mistral's and FlashAttention's window_size=(window - 1, 0). Run as a (Tq, Tk) bool mask
            (combined with attn_mask, which is then materialized at their broadcast shape), so it needs a backend
            that fuses masks; ext on CPU skips the key tiles wholly outside the window. None: no window.

    Returns:
        (B, Hq, Tq, D) tensor of q's dtype. Query i sees keys j <= i: the causal mask is aligned to the top-left
        corner, as torch's is_causal=True (FlashAttention >= 2.1 aligns bottom-right). 1 = attends:

            Tq = 2, Tk = 5:      Tq = 5, Tk = 2:
                1 0 0 0 0            1 0
                1 1 0 0 0            1 1
                                     1 1  (rows past Tk see every key)

        A row whose keys are all masked out gives 0, as torch does.

    Raises:
        TypeError / ValueError naming the problem (non-float, mixed dtypes or devices, bad shapes, D > 256).
        chargpt_kernels.BackendUnavailable when the backend asked for cannot run here.
    """
    _check_float_tensors("causal_attention", q=q, k=k, v=v)
    if window is not None and not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"causal_attention: window must be a positive int or None, got {window!r}")
    refusal = _attention_refusal(q, k, v, dropout_p, scale, enable_gqa)
    if refusal is None and attn_mask is not None:
        refusal = _mask_refusal(attn_mask, q, k)
    if refusal is not None:
        raise ValueError(f"causal_attention: {refusal[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if window is not None:
        band = _window_mask(q.shape[2], k.shape[2], window, q.device)
        if attn_mask is None or attn_mask.dtype == torch.bool:
            attn_mask = band if attn_mask is None else attn_mask & band
        else:
            attn_mask = attn_mask.masked_fill(~band, float("-inf"))
    mask = None if attn_mask is None else attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if _is_empty(q, k, v):  # empty in, empty out (keys: none, so every weight row is empty and the output 0)
        return reference.attention(q, k, v, True, float(dropout_p), scale, mask)
    fn = backends.implementation(backend, "attention", q, _needs(mask, q, k))
    return fn(q, k, v, True, float(dropout_p), scale, *(() if mask is None else (mask,)))


def _fall_back(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"chargpt_kernels.scaled_dot_product_attention: {reason}; using torch's implementation",
                      stacklevel=3)


def _fold(t, lead):
    """(*lead, H, T, X) -> (prod(lead), H, T, X): the kernels' 4-D view (lead = () for 2-D (T, X) inputs)."""
    return t.reshape(math.prod(lead), -1, *t.shape[-2:]) if t.dim() > 2 else t.reshape(1, 1, *t.shape)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention: same arguments, same result.

    Arguments:
        query: (..., Hq, Tq, D); key, value: (..., Hk, Tk, D). Leading dims are folded into one batch dim.
        attn_mask, dropout_p, is_causal, scale, enable_gqa: as in torch. is_causal aligns top-left (see
            `causal_attention` for the picture when Tq != Tk); a fully masked row gives 0.

    Returns:
        (..., Hq, Tq, D), the query's dtype.

    Fused: masks (bool or additive, any shape broadcastable to (..., Hq, Tq, Tk), read through stride-0 views) and
    GQA where the backend fuses them, head dim <= 256, dropout_p in [0, 1), a finite scale. Anything else runs
    torch's own implementation, with one warning per reason (not per call or shape).
    """
    if not _float_tensors_ok(query, key, value):
        _check_float_tensors("scaled_dot_product_attention", query=query, key=key, value=value)

    def torch_sdpa():
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)

    if query.dim() < 2 or query.dim() != key.dim() or key.dim() != value.dim():
        _fall_back("inputs of different ranks are not fused")
        return torch_sdpa()
    if _is_empty(query, key, value):
        return _empty_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None and is_causal:
        return torch_sdpa()  # torch refuses a mask with is_causal: nothing to fuse
    lead = query.shape[:-3]
    if query.dim() != 4:
        if key.shape[:-3] != lead or value.shape[:-3] != lead:
            _fall_back("broadcasting the batch dims is not fused")
            return torch_sdpa()
        mask = attn_mask
        if isinstance(mask, torch.Tensor):  # broadcast to the full (..., Hq, Tq, Tk), then fold like the inputs
            try:
                mask = _fold(mask.expand(*query.shape[:-1], key.shape[-2]), lead)
            except RuntimeError:
                _fall_back("an attn_mask that does not broadcast to (..., H, Tq, Tk) is not fused")
                return torch_sdpa()
        out = scaled_dot_product_attention(_fold(query, lead), _fold(key, lead), _fold(value, lead), mask,
                                           dropout_p, is_causal, scale, enable_gqa)
        return out.reshape(*query.shape[:-1], out.shape[-1])
    refusal = _attention_refusal(query, key, value, dropout_p, scale, enable_gqa)
    if refusal is None and attn_mask is not None:
        refusal = _mask_refusal(attn_mask, query, key)
    if refusal is not None:
        _fall_back(refusal[0])
        if scale is not None and not math.isfinite(scale) and not enable_gqa and attn_mask is None:
            # torch's float32 sdpa returns 0 for scale=nan; the composed math gives float64's answer (NaN)
            return reference.attention(query, key, value, bool(is_causal), dropout_p, scale)
        return torch_sdpa()
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = None if attn_mask is None else attn_mask.expand(*query.shape[:-1], key.shape[-2])
    needs = _needs(mask, query, key)
    backend, fn = backends.choose(None, "attention", query)  # raises if the backend cannot run these tensors at all
    if needs:
        try:
            backend, fn = backends.choose(None, "attention", query, needs)
        except TypeError:  # the backend in use runs attention, but not with these features
            backend = None
        if backend is None or (backend == "eager" and backends.current_backend() == "auto"):
            _fall_back(_FEATURE_REASONS[needs[0]])  # no fused kernel takes this here: torch's beats composed math
            return torch_sdpa()
    return fn(query, key, value, bool(is_causal), float(dropout_p), scale, *(() if mask is None else (mask,)))


def layer_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.layer_norm on a fused backend.

    Arguments:
        input: (..., *normalized_shape) float tensor, any strides.
        normalized_shape: the trailing dims to normalize over (an int for one dim).
        weight, bias: normalized_shape-shaped tensors of input's dtype and device, or None.
        eps: added to the biased variance; must be > 0 (torch computes something for eps <= 0; we raise).
        backend: eager, triton, ext or auto; None means the current one (`chargpt_kernels.use_backend`).

    Returns:
        A tensor of input's shape and dtype: (x - mean) / sqrt(var + eps) * weight + bias, statistics in fp32.

    Raises:
        TypeError / ValueError naming the problem; chargpt_kernels.BackendUnavailable when the backend cannot run here.
    """
    # The common case (one normalized dim, matching tensors), checked and dispatched with few Python operations:
    # at small shapes the Python around the kernel costs more than the kernel.
    n = normalized_shape if isinstance(normalized_shape, int) else (
        normalized_shape[0] if isinstance(normalized_shape, (tuple, list)) and len(normalized_shape) == 1 else None)
    if (isinstance(n, int) and _float_tensors_ok(input, weight, bias) and input.dim() >= 1 and input.shape[-1] == n
            and (weight is None or (weight.dim() == 1 and weight.shape[0] == n))
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == n))
            and isinstance(eps, (int, float)) and 0 < eps < math.inf and input.numel() > 0):
        fn = backends.implementation(backend, "layer_norm", input)
        if input.dim() == 2:
            return fn(input, weight, bias, float(eps))
        return fn(input.reshape(-1, n), weight, bias, float(eps)).view(input.shape)
    return _layer_norm_checked(input, normalized_shape, weight, bias, eps, backend)


def _layer_norm_checked(input, normalized_shape, weight, bias, eps, backend):
    """layer_norm for anything off the common path: every check, with a message that says what is wrong."""
    rows, n = _norm_rows("layer_norm", input, normalized_shape, weight=weight, bias=bias)
    eps = _check_eps("layer_norm", eps, input.dtype, allow_none=False)
    fn = _norm_fn(backend, "layer_norm", input)
    return fn(input.reshape(rows, n), _flat(weight, n), _flat(bias, n), eps).view(input.shape)


def _norm_rows(op, input, normalized_shape, **params):
    """(rows, n): the (M, N) view a norm kernel takes of `input`, after checking input and its parameters."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    given = {"input": input}
    given.update({name: t for name, t in params.items() if t is not None})
    _check_float_tensors(op, **given)
    dims = len(normalized_shape)
    if dims == 0 or input.dim() < dims or tuple(input.shape[input.dim() - dims:]) != normalized_shape:
        raise ValueError(f"{op}: input of shape {tuple(input.shape)} does not end in normalized_shape "
                         f"{normalized_shape}")
    for name, t in given.items():
        if name != "input" and tuple(t.shape) != normalized_shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {normalized_shape}")
    return math.prod(input.shape[:input.dim() - dims]), math.prod(normalized_shape)


def _check_eps(op, eps, dtype, allow_none):
    if eps is None and allow_none:
        return torch.finfo(dtype).eps  # torch's default for RMSNorm
    if not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
        raise ValueError(f"{op}: eps must be a finite positive number, got {eps!r}")
    return float(eps)


def _flat(t, n):
    return None if t is None else t.reshape(n)


def _norm_fn(backend, op, input):
    # Empty in, empty out, like torch (and still differentiable): nothing for a kernel to do.
    return getattr(reference, op) if input.numel() == 0 else backends.implementation(backend, op, input)


def rms_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.rms_norm on a fused backend: x / sqrt(mean(x^2) + eps) * weight.

    Arguments:
        input: (..., *normalized_shape) float tensor, any strides.
        normalized_shape: the trailing dims to normalize over (an int for one dim).
        weight: a normalized_shape-shaped tensor of input's dtype and device, or None.
        eps: added to the mean square; None means torch's default (the machine epsilon of input's dtype).
        backend: eager, triton, ext or auto; None means the current one (`chargpt_kernels.use_backend`).

    Returns:
        A tensor of input's shape and dtype; the mean square is accumulated in fp32.
    """
    rows, n = _norm_rows("rms_norm", input, normalized_shape, weight=weight)
    eps = _check_eps("rms_norm", eps, input.dtype, allow_none=True)
    return _norm_fn(backend, "rms_norm", input)(input.reshape(rows, n), _flat(weight, n), eps).view(input.shape)


NORMS = ("layer", "rms")


def add_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
             weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: Optional[float] = 1e-5,
             norm: str = "layer", dropout_p: float = 0.0, backend: Optional[str] = None) -> tuple:
    """A pre-LN block's residual add fused with the next norm: h = residual + dropout(x), y = norm(h).

    Arguments:
        x: the sublayer's output (..., *normalized_shape); residual: the residual stream, same shape, dtype, device.
        normalized_shape, weight, bias, eps: as in `layer_norm` (norm="layer") or `rms_norm` (norm="rms": no bias;
            eps None means torch's default).
        norm: "layer" or "rms".
        dropout_p: dropout on x in [0, 1), drawn inside the kernel from torch's RNG (chargpt_kernels.reference states
            the mask: same seed, same mask), regenerated in the backward, never stored.
        backend: eager, triton, ext or auto; None means the current one (`chargpt_kernels.use_backend`).

    Returns:
        (y, h), both of x's shape and dtype: the normalized output and the new residual stream. Gradients flow to
        x, residual, weight and bias from both.
    """
    if norm not in NORMS:
        raise ValueError(f"add_norm: norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    if norm == "rms" and bias is not None:
        raise ValueError("add_norm: norm='rms' takes no bias")
    rows, n = _norm_rows("add_norm", x, normalized_shape, weight=weight, bias=bias)
    _check_float_tensors("add_norm", x=x, residual=residual)
    if residual.shape != x.shape:
        raise ValueError(f"add_norm: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    eps = _check_eps("add_norm", eps, x.dtype, allow_none=norm == "rms")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"add_norm: dropout_p must be in [0, 1), got {dropout_p!r}")
    y, h = _norm_fn(backend, "add_norm", x)(x.reshape(rows, n), residual.reshape(rows, n), _flat(weight, n),
                                            _flat(bias, n), eps, norm, float(dropout_p))
    return y.view(x.shape), h.view(x.shape)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.linear: input @ weight^T + bias.

    Arguments:
        input: (..., K) float tensor, any strides; weight: (N, K); bias: (N,) or None; one dtype and device.
        backend: eager, triton, ext or auto; None means the current one (`chargpt_kernels.use_backend`).

    Returns:
        (..., N), input's dtype. The fused kernel is ext's CPU GEMV for the few rows of decoding (float32, up to
        ext_linear.GEMV_MAX_ROWS rows after folding the leading dims); more rows take torch's GEMM there.

    Raises:
        TypeError / ValueError naming the problem; chargpt_kernels.BackendUnavailable when the backend cannot run here;
        TypeError when the backend named has no linear kernel for these tensors (triton has none).
    """
    # The common case checked with few Python operations: decoding calls this for every weight of every step.
    if (_float_tensors_ok(input, weight, bias) and weight.dim() == 2 and input.dim() >= 1
            and input.shape[-1] == weight.shape[1] and (bias is None or bias.shape == weight.shape[:1])
            and input.numel() > 0 and weight.numel() > 0):
        fn = backends.implementation(backend, "linear", input)
        if input.dim() == 2:
            return fn(input, weight, bias)
        return fn(input.reshape(-1, weight.shape[1]), weight, bias).view(*input.shape[:-1], weight.shape[0])
    return _linear_checked(input, weight, bias, backend)


def _linear_checked(input, weight, bias, backend):
    """linear for anything off the common path: every check, with a message that says what is wrong."""
    _check_float_tensors("linear", input=input, weight=weight, **({} if bias is None else {"bias": bias}))
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input {tuple(input.shape)} and weight {tuple(weight.shape)} do not fit: weight "
                         f"must be 2-D (out_features, in_features) and input end in in_features")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    # Every check passed, so the common path was left for an empty input: empty (or bias-only) out, as torch.
    return reference.linear(input, weight, bias)
