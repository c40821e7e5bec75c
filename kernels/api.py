"""The public ops: validate the request once, then hand it to the backend `kernels.backends` picks."""

import math
import warnings

import torch
import torch.nn.functional as F

from kernels import backends

MAX_HEAD_DIM = 256
# Held at import, so the fallback still reaches torch after a user swaps F.scaled_dot_product_attention for ours.
_torch_sdpa = F.scaled_dot_product_attention
_warned = set()


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


def _attention_problem(q, k, v, dropout_p, scale):
    """None for a request every backend can run, else what is wrong with it (shapes as (B, H, T, D))."""
    if _attention_ok(q, k, v, dropout_p, scale):  # the common case, checked with few Python operations
        return None
    _check_float_tensors("attention", q=q, k=k, v=v)
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p must be in [0, 1), got {dropout_p}"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return f"scale must be a finite number or None, got {scale!r}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D (B, H, T, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D"
    if q.shape[2] < 1 or k.shape[2] < 1:
        return f"sequence lengths must be >= 1, got Tq={q.shape[2]}, Tk={k.shape[2]}"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim D must be in [1, {MAX_HEAD_DIM}], got {q.shape[-1]}"
    return None


def _attention_ok(q, k, v, dropout_p, scale):
    """True only for requests `_attention_problem` accepts: the same conditions, tested cheaply."""
    if not (_float_tensors_ok(q, k, v) and isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0
            and (scale is None or (isinstance(scale, (int, float)) and math.isfinite(scale)))):
        return False
    qs, ks = q.shape, k.shape
    return (len(qs) == 4 and len(ks) == 4 and ks == v.shape and qs[0] == ks[0] and qs[1] == ks[1]
            and qs[3] == ks[3] and qs[2] >= 1 and ks[2] >= 1 and 1 <= qs[3] <= MAX_HEAD_DIM)


def causal_attention(q, k, v, dropout_p=0.0, scale=None, backend=None):
    """Causal softmax(q k^T * scale) v for (B, H, T, D) tensors on a fused backend; raises on anything unsupported.

    scale defaults to 1/sqrt(D). Dropout on the attention weights is drawn inside the kernel from torch's RNG.
    """
    problem = _attention_problem(q, k, v, dropout_p, scale)
    if problem is not None:
        raise ValueError(f"causal_attention: {problem}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return backends.resolve(backend, backends.ATTENTION, q).attention(q, k, v, True, float(dropout_p), scale)


def _fall_back(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernels.scaled_dot_product_attention: {reason}; using torch's implementation", stacklevel=3)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for F.scaled_dot_product_attention: fused for attn_mask=None, torch (warned once) otherwise.

    Any leading dims are folded into (B, H); an explicit mask, GQA, a value dim unlike the query's or D > 256
    go to torch's own implementation.
    """
    if not _float_tensors_ok(query, key, value):
        _check_float_tensors("scaled_dot_product_attention", query=query, key=key, value=value)
    torch_sdpa = lambda: _torch_sdpa(  # noqa: E731
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa)
    if attn_mask is not None:
        _fall_back("an explicit attn_mask is not fused")
        return torch_sdpa()
    if query.dim() < 2 or query.dim() != key.dim() or key.shape != value.shape:
        _fall_back("these shapes are not fused")
        return torch_sdpa()
    lead = query.shape[:-2]
    if query.dim() != 4:
        flat = lambda t: t.reshape(1, -1, *t.shape[-2:])  # noqa: E731
        out = scaled_dot_product_attention(flat(query), flat(key), flat(value), None, dropout_p, is_causal, scale)
        return out.reshape(*lead, *out.shape[-2:])
    problem = _attention_problem(query, key, value, dropout_p, scale)
    if problem is not None:
        _fall_back(problem)
        return torch_sdpa()
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    module = backends.resolve(None, backends.ATTENTION, query)
    return module.attention(query, key, value, bool(is_causal), float(dropout_p), scale)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None):
    """F.layer_norm-compatible LayerNorm on a fused backend: statistics over the trailing `normalized_shape`."""
    # The common case (one normalized dim, matching tensors), checked and dispatched with few Python operations:
    # at small shapes the Python around the kernel costs more than the kernel.
    n = normalized_shape if isinstance(normalized_shape, int) else (
        normalized_shape[0] if isinstance(normalized_shape, (tuple, list)) and len(normalized_shape) == 1 else None)
    if (isinstance(n, int) and _float_tensors_ok(input, weight, bias) and input.dim() >= 1 and input.shape[-1] == n
            and (weight is None or (weight.dim() == 1 and weight.shape[0] == n))
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == n))
            and isinstance(eps, (int, float)) and eps > 0):
        module = backends.resolve(backend, backends.LAYER_NORM, input)
        if input.dim() == 2:
            return module.layer_norm(input, weight, bias, float(eps))
        return module.layer_norm(input.reshape(-1, n), weight, bias, float(eps)).view(input.shape)
    return _layer_norm_checked(input, normalized_shape, weight, bias, eps, backend)


def _layer_norm_checked(input, normalized_shape, weight, bias, eps, backend):
    """layer_norm for anything off the common path: every check, with a message that says what is wrong."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    given = {"input": input}
    given.update({name: t for name, t in (("weight", weight), ("bias", bias)) if t is not None})
    _check_float_tensors("layer_norm", **given)
    dims = len(normalized_shape)
    if dims == 0 or tuple(input.shape[input.dim() - dims:]) != normalized_shape or input.dim() < dims:
        raise ValueError(f"layer_norm: input of shape {tuple(input.shape)} does not end in normalized_shape "
                         f"{normalized_shape}")
    for name, t in given.items():
        if name != "input" and tuple(t.shape) != normalized_shape:
            raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)}, expected {normalized_shape}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"layer_norm: eps must be a positive number, got {eps!r}")
    n = math.prod(normalized_shape)
    module = backends.resolve(backend, backends.LAYER_NORM, input)
    flat = lambda t: None if t is None else t.reshape(n)  # noqa: E731
    y = module.layer_norm(input.reshape(-1, n), flat(weight), flat(bias), float(eps))
    return y.view(input.shape)
