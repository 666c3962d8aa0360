"""FP4 linear layers for Flax.

``y = Q(x) @ W.T + b`` with ``W`` the FP4 weight of shape ``(out_features, in_features)`` kept in
PyTorch's orientation (never transposed into Flax's ``(in, out)`` kernel), ``Q`` the recipe's
activation quantization (identity for W4A16), float32 accumulation, output in ``x.dtype``.
"""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from jaxfp4.formats import (
    MXFP4W4A8,
    NVFP4W4A4,
    FP4Format,
    QuantizedTensor,
    Recipe,
    quantize_mxfp4_llmcompressor,
    quantize_nvfp4_llmcompressor,
    quantize_nvfp4_modelopt,
)
from jaxfp4.ops import Fp4LinearParams, KernelLayout, SplitKSum, fp4_linear, fp4_linear_deferred
from jaxfp4.sharding import TensorParallel, shard_params, tp_linear


class QuantizedParam(nnx.Param):
    """An NNX parameter holding a :class:`QuantizedTensor` (filter on this type to select,
    freeze or shard FP4 weights separately from float parameters)."""


def _hint(prefetch: Fp4Linear | Fp4LinearParams | None) -> Fp4LinearParams | None:
    """A next-layer hint as ``fp4_linear``'s ``prefetch`` (none for a tensor-parallel layer)."""
    if isinstance(prefetch, Fp4Linear):
        return None if prefetch.tp is not None else prefetch.params()
    return prefetch


class Fp4Linear(nnx.Module):
    """An FP4 linear layer (NNX).

    Args:
      in_features: K, the input width (a multiple of the format's block: 16 NVFP4, 32 MXFP4).
      out_features: N, the output width.
      weight: the :class:`QuantizedTensor` ``(N, K)``.
      recipe: the scheme (``NVFP4W4A4()``, ``NVFP4W4A16()``, ``MXFP4W4A8()``, ``MXFP4W4A16()``).
      input_scale: W4A4: the NVFP4 activation global divisor; W4A8: the FP8 activation scale
        (a multiplier); ``None`` for W4A16.
      bias: optional ``[N]`` bias.
      backend: ``None`` (auto), ``"pallas"`` or ``"xla"``.
      tp: optional :class:`jaxfp4.sharding.TensorParallel`: the params are placed on its mesh
        (column: split along N, row: along K) and each call runs per shard under ``shard_map``.
      kernel_layout: optional :class:`jaxfp4.ops.KernelLayout` of ``weight`` (from
        :func:`jaxfp4.prepare_weights`) for the GPU kernel; under ``tp`` each shard gets its own
        (:func:`jaxfp4.sharding.shard_params` with ``prepare=True``) in place of a whole-weight one.

    >>> import jax, jax.numpy as jnp, jaxfp4
    >>> dense = nnx.Linear(64, 32, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    >>> layer = Fp4Linear.from_dense(dense, recipe=jaxfp4.NVFP4W4A16())
    >>> layer(jnp.ones((2, 64), jnp.bfloat16)).shape
    (2, 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight: QuantizedTensor,
        recipe: Recipe,
        input_scale: jax.Array | float | None = None,
        bias: jax.Array | None = None,
        backend: str | None = None,
        tp: TensorParallel | None = None,
        kernel_layout: KernelLayout | None = None,
    ):
        if weight.shape != (out_features, in_features):
            raise ValueError(f"weight shape {weight.shape} != (out_features, in_features) = {(out_features, in_features)}")
        self.in_features = in_features
        self.out_features = out_features
        self.recipe = recipe
        self.backend = backend
        self.tp = tp
        name = f"Fp4Linear({in_features}, {out_features})"
        p = Fp4LinearParams(
            weight=weight,
            input_scale=None if input_scale is None else jnp.asarray(input_scale, jnp.float32).reshape(()),
            bias=None if bias is None else jnp.asarray(bias),
            recipe=recipe,
            kernel_layout=kernel_layout,
        ).validate(name)
        if tp is not None:
            p = shard_params(p, tp, name)
        self.weight = QuantizedParam(p.weight)
        self.kernel_layout = None if p.kernel_layout is None else QuantizedParam(p.kernel_layout)
        self.input_scale = None if p.input_scale is None else nnx.Param(p.input_scale)
        self.bias = None if p.bias is None else nnx.Param(p.bias)

    def params(self) -> Fp4LinearParams:
        """The layer as the functional :class:`Fp4LinearParams` pytree."""
        return Fp4LinearParams(
            weight=self.weight.get_value(),
            input_scale=None if self.input_scale is None else self.input_scale.get_value(),
            bias=None if self.bias is None else self.bias.get_value(),
            recipe=self.recipe,
            kernel_layout=None if self.kernel_layout is None else self.kernel_layout.get_value(),
        )

    def __call__(self, x: jax.Array, *, prefetch: Fp4Linear | Fp4LinearParams | None = None) -> jax.Array:
        """``prefetch``: the layer that runs next (a hint, see :func:`~jaxfp4.fp4_linear`;
        ignored under ``tp``)."""
        if self.tp is not None:
            return tp_linear(x, self.params(), self.tp, backend=self.backend)
        return fp4_linear(x, self.params(), backend=self.backend, prefetch=_hint(prefetch))

    def deferred(self, x: jax.Array, *, prefetch: Fp4Linear | Fp4LinearParams | None = None) -> jax.Array | SplitKSum:
        """The layer's output, or where the Mosaic GPU kernel splits K (decode shapes, no bias)
        its partials before their sum (:func:`jaxfp4.ops.fp4_linear_deferred`; ``resolve()`` is
        the output bit for bit), for a consumer kernel that sums them itself. Under ``tp``: the
        output. ``prefetch`` as in ``__call__``."""
        if self.tp is not None:
            return self(x)
        return fp4_linear_deferred(x, self.params(), backend=self.backend, prefetch=_hint(prefetch))

    @classmethod
    def from_params(
        cls, params: Fp4LinearParams, *, backend: str | None = None, tp: TensorParallel | None = None
    ) -> Fp4Linear:
        """Wrap functional params (e.g. ``load_checkpoint(...).quantized[module]``) as a layer."""
        return cls(
            params.in_features,
            params.out_features,
            weight=params.weight,
            recipe=params.recipe,
            input_scale=params.input_scale,
            bias=params.bias,
            backend=backend,
            tp=tp,
            kernel_layout=params.kernel_layout,
        )

    @classmethod
    def from_dense(
        cls,
        dense: nnx.Linear,
        *,
        recipe: Recipe,
        encoder: str = "llmcompressor",
        input_scale: float | None = None,
        backend: str | None = None,
    ) -> Fp4Linear:
        """Quantize an ``nnx.Linear`` (kernel ``(in, out)``) with a producer's encoder.

        ``encoder``: ``"llmcompressor"`` (NVFP4 or MXFP4) or ``"modelopt"`` (NVFP4). W4A4 / W4A8
        need ``input_scale`` (see the class docstring): calibration is the producer's job.
        """
        w = dense.kernel.get_value().T  # (N, K), PyTorch orientation
        if recipe.weight_format is FP4Format.MXFP4:
            if encoder != "llmcompressor":
                raise ValueError(f"MXFP4 has only the 'llmcompressor' encoder, got {encoder!r}")
            q = quantize_mxfp4_llmcompressor(w)
        elif encoder == "llmcompressor":
            q = quantize_nvfp4_llmcompressor(w)
        elif encoder == "modelopt":
            q = quantize_nvfp4_modelopt(w)
        else:
            raise ValueError(f"unknown encoder {encoder!r}; expected 'llmcompressor' or 'modelopt'")
        if isinstance(recipe, NVFP4W4A4 | MXFP4W4A8) and input_scale is None:
            raise ValueError(f"{recipe.name} needs input_scale")
        bias = None if dense.bias is None else dense.bias.get_value()
        return cls(
            dense.in_features,
            dense.out_features,
            weight=q,
            recipe=recipe,
            input_scale=input_scale,
            bias=bias,
            backend=backend,
        )


class Fp4LinearLinen(linen.Module):
    """The linen form of :class:`Fp4Linear`: quantized params are passed in, not initialized
    (``params`` is an :class:`Fp4LinearParams`, e.g. from ``load_checkpoint``)."""

    params_: Fp4LinearParams
    backend: str | None = None

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fp4_linear(x, self.params_, backend=self.backend)
