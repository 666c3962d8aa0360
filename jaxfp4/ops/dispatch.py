"""``fp4_linear``: the one dispatch point for every FP4 linear layer.

Backends register in one ordered table. ``backend=None`` ("auto") takes the first backend
(in table order: fastest first) that supports the call; an explicit backend never falls back:
if it cannot run, the error lists every backend's reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxfp4.formats.activations import FLOAT_ACTIVATION_DTYPES
from jaxfp4.ops import pallas as _pallas
from jaxfp4.ops import xla as _xla
from jaxfp4.ops.params import Fp4LinearParams


@dataclasses.dataclass(frozen=True)
class Backend:
    """One execution path: ``unsupported_reason`` returns ``None`` if it can run the call."""

    name: str
    unsupported_reason: Callable[[jax.Array, Fp4LinearParams], str | None]
    forward: Callable[..., jax.Array]  # (x, params, bias, out_dtype, prefetch) -> y


#: Ordered by preference for ``backend=None``.
BACKENDS: dict[str, Backend] = {m.NAME: Backend(m.NAME, m.unsupported_reason, m.forward) for m in (_pallas, _xla)}


def _check_call(
    x: jax.Array, params: Fp4LinearParams, bias: jax.Array | None, prefetch: Fp4LinearParams | None = None
) -> None:
    if not isinstance(params, Fp4LinearParams):
        raise TypeError(f"params must be Fp4LinearParams, got {type(params).__name__}")
    if jnp.dtype(x.dtype) not in FLOAT_ACTIVATION_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != params.in_features:
        raise ValueError(f"x has shape {x.shape}; its last axis must be in_features={params.in_features}")
    if bias is not None and tuple(bias.shape) != (params.out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({params.out_features},)")
    if prefetch is not None and not isinstance(prefetch, Fp4LinearParams):
        raise TypeError(f"prefetch must be Fp4LinearParams or None, got {type(prefetch).__name__}")


def select_backend(x: jax.Array, params: Fp4LinearParams, backend: str | None = None) -> Backend:
    """The backend that ``fp4_linear`` would run for this call (raises if none can)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    names = [backend] if backend is not None else list(BACKENDS)
    reasons = {}
    for name in names:
        reason = BACKENDS[name].unsupported_reason(x, params)
        if reason is None:
            return BACKENDS[name]
        reasons[name] = reason
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise ValueError(f"no backend can run fp4_linear({params.recipe.name}, x{tuple(x.shape)} {x.dtype}): {detail}")


def fp4_linear(
    x: jax.Array,
    params: Fp4LinearParams,
    *,
    bias: jax.Array | None = None,
    backend: str | None = None,
    out_dtype: jnp.dtype | None = None,
    prefetch: Fp4LinearParams | None = None,
) -> jax.Array:
    """``y = Q(x) @ W.T + b`` for an FP4 weight ``W`` of shape ``(N, K)``.

    Args:
      x: activations ``[..., K]`` in bfloat16, float16 or float32; any leading rank.
      params: :class:`Fp4LinearParams` (weight, recipe, activation scale, optional bias).
      bias: optional ``[N]`` bias, overriding ``params.bias``; added in float32.
      backend: ``None`` (auto: the fastest that supports the call), ``"pallas"`` or ``"xla"``.
      out_dtype: the output dtype; default ``x.dtype``. ``jnp.float32`` returns the float32
        accumulator unrounded (row-parallel layers sum such partials across devices).
      prefetch: the params of the layer that runs next (a hint; never changes the result). Where
        this call and that layer both run the Mosaic GPU kernel (prepared weights, decode-sized
        ``M``), this kernel asks the L2 cache for the first :data:`~jaxfp4.ops.pallas.L2_PREFETCH_BYTES`
        of that layer's weight in the order its kernel reads them, as its own CTAs finish, so
        that the HBM reads overlap the small operations between the two; elsewhere ignored.

    Returns:
      ``[..., N]`` in ``out_dtype``. ``Q`` is the recipe's activation quantization (identity for
      W4A16). Accumulation is float32. Runs under ``jax.named_scope("jaxfp4.<backend>")``.
    """
    bias = params.bias if bias is None else bias
    _check_call(x, params, bias, prefetch)
    chosen = select_backend(x, params, backend)
    with jax.named_scope(f"jaxfp4.{chosen.name}"):
        return chosen.forward(x, params, bias, jnp.dtype(x.dtype if out_dtype is None else out_dtype), prefetch)


def fp4_linear_deferred(
    x: jax.Array,
    params: Fp4LinearParams,
    *,
    backend: str | None = None,
    prefetch: Fp4LinearParams | None = None,
) -> jax.Array | _pallas.SplitKSum:
    """:func:`fp4_linear` (the params' bias, output in ``x.dtype``) one step short where that
    step would be a kernel of its own: when the "pallas" backend runs the Mosaic GPU kernel with
    K split (decode shapes) and there is no bias, the float32 partials and row multipliers as a
    :class:`~jaxfp4.ops.SplitKSum`, whose ``resolve()`` is :func:`fp4_linear`'s output bit for
    bit, for a kernel that sums them in its own pass (:func:`jaxfp4.kernels.norm_triton.add_rms_norm`);
    otherwise :func:`fp4_linear`'s output. ``prefetch`` as there."""
    _check_call(x, params, params.bias, prefetch)
    chosen = select_backend(x, params, backend)
    with jax.named_scope(f"jaxfp4.{chosen.name}"):
        if chosen.name == _pallas.NAME:
            return _pallas.forward(x, params, params.bias, jnp.dtype(x.dtype), prefetch, defer=True)
        return chosen.forward(x, params, params.bias, jnp.dtype(x.dtype), prefetch)
