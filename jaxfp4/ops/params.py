"""Per-layer quantized parameters: the pytree that ``fp4_linear`` consumes.

``Fp4LinearParams`` = the FP4 weight (:class:`QuantizedTensor`, PyTorch ``(N, K)`` layout), the
recipe (static), the scheme's activation scale and an optional bias ``[N]``.

Activation scale conventions, normalized once when params are built:

* NVFP4 W4A4: ``input_scale`` is the float32 **divisor** ``g_x`` of the activation quantizer
  (compressed-tensors ``input_global_scale``; ``1 / input_scale`` for ModelOpt, ``1 /
  input_scale_2`` for Quark; the max over fused partitions, which see the same input).
* MXFP4 W4A8: ``input_scale`` is the float32 **multiplier** ``s`` of static FP8 activations
  (``x ~ fp8 * s``; Quark stores it in the model dtype, the value is kept exactly).
* W4A16 recipes: ``input_scale`` is ``None``.

``kernel_layout`` (optional) holds the same weight re-laid out for a GPU kernel, made once at load
time by the pure transform :func:`jaxfp4.ops.prepare_weights`; the reference ``weight`` stays as
the producer wrote it and every other code path reads only that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxfp4.formats import (
    MXFP4W4A8,
    MXFP4W4A16,
    NVFP4W4A4,
    NVFP4W4A16,
    QuantizedTensor,
    Recipe,
    concat_partitions,
)

_RECIPES = (NVFP4W4A4, NVFP4W4A16, MXFP4W4A8, MXFP4W4A16)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """A weight re-laid out for the Mosaic GPU kernel (:mod:`jaxfp4.kernels.w4a16_mgpu`).

    ``codes``: uint8 ``(Np, Kp/2)``, each code's 4 bits placed inside its 16-byte chunk
    (:func:`~jaxfp4.kernels.w4a16_mgpu.kernel_operands`: zero and negative NVFP4 scales folded
    into them first); ``scales``: uint8 ``(Kp/B, Np)``, the kernel's block-scale bytes, transposed
    (E8M0 as is, E4M3 re-encoded: :func:`~jaxfp4.kernels.w4a16_mgpu.prepare_scales`). ``N`` is
    padded to a multiple of 64 and ``K`` to a multiple of 128 with zero codes (which contribute
    nothing); ``n``, ``k`` are the unpadded sizes. ``row_scale``: float32 ``(Np,)``, what the
    kernel multiplies its float32 sums by, per weight row: the row's global multiplier (1 for
    MXFP4) times ``2**c`` (the kernel's exponent offset,
    :func:`~jaxfp4.kernels.w4a16_mgpu.epilogue_exponent`) times the W4A8 activation scale; 0 on
    padded rows, NaN on rows with a NaN block scale. Made with the rest of the layout so that a
    call runs no per-layer arithmetic before the kernel; it is a function of the weight's global
    scales and ``input_scale`` at :func:`~jaxfp4.ops.prepare_weights` time (prepare again after
    changing either).

    ``shards > 1``: the layouts of the tensor-parallel shards of the weight (each shard laid out
    on its own, padded on its own), stacked along a new leading axis: ``codes (shards, Np, Kp/2)``,
    ``scales (shards, Kp/B, Np)``, ``row_scale (shards, Np)``, ``n``, ``k`` the sizes of one shard. Made by
    :func:`jaxfp4.sharding.shard_params` with the leading axis split over the mesh axis, and read
    only per shard, by :func:`jaxfp4.sharding.tp_linear`; the single-device kernel path ignores it."""

    codes: jax.Array
    scales: jax.Array
    row_scale: jax.Array
    n: int
    k: int
    shards: int = 1

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(Np, Kp)``: one shard's padded weight shape, as the kernel sees it."""
        return self.codes.shape[-2], self.codes.shape[-1] * 2

    def shard(self, i: int = 0) -> KernelLayout:
        """Shard ``i``'s layout (``shards == 1``); under ``shard_map`` the local stack has one entry."""
        if self.shards == 1:
            return self
        return KernelLayout(self.codes[i], self.scales[i], self.row_scale[i], self.n, self.k)


jax.tree_util.register_dataclass(
    KernelLayout, data_fields=["codes", "scales", "row_scale"], meta_fields=["n", "k", "shards"]
)


@dataclasses.dataclass(frozen=True)
class Fp4LinearParams:
    """Quantized parameters of one linear layer ``y = x @ W.T + b`` (``W`` is ``(N, K)``)."""

    weight: QuantizedTensor
    input_scale: jax.Array | None
    bias: jax.Array | None
    recipe: Recipe
    kernel_layout: KernelLayout | None = None

    @property
    def in_features(self) -> int:
        return self.weight.k

    @property
    def out_features(self) -> int:
        return self.weight.n

    def validate(self, name: str = "layer") -> Fp4LinearParams:
        """Check the recipe, weight, activation scale and bias; raise one clear error."""
        if not isinstance(self.recipe, _RECIPES):
            raise TypeError(f"{name}: unknown recipe {self.recipe!r}; expected one of {[r.__name__ for r in _RECIPES]}")
        if not isinstance(self.weight, QuantizedTensor):
            raise TypeError(f"{name}: weight must be a QuantizedTensor, got {type(self.weight).__name__}")
        if self.weight.format is not self.recipe.weight_format:
            raise ValueError(
                f"{name}: recipe {self.recipe.name} needs {self.recipe.weight_format.value} weights, "
                f"got {self.weight.format.value}"
            )
        self.weight.validate(f"{name}.weight")
        needs_scale = isinstance(self.recipe, NVFP4W4A4 | MXFP4W4A8)
        if needs_scale:
            if self.input_scale is None:
                raise ValueError(f"{name}: recipe {self.recipe.name} needs a static activation scale")
            if self.input_scale.dtype != jnp.float32 or self.input_scale.shape != ():
                raise TypeError(
                    f"{name}: input_scale must be a float32 scalar, got {self.input_scale.dtype}{self.input_scale.shape}"
                )
        elif self.input_scale is not None:
            raise ValueError(f"{name}: recipe {self.recipe.name} takes no activation scale")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.n,):
            raise ValueError(f"{name}: bias has shape {tuple(self.bias.shape)}, expected ({self.weight.n},)")
        kl = self.kernel_layout
        if kl is not None and self.weight.shape not in ((kl.n * kl.shards, kl.k), (kl.n, kl.k * kl.shards)):
            of = f"{kl.shards} shards of " if kl.shards > 1 else ""
            raise ValueError(f"{name}: kernel_layout is of {of}a ({kl.n}, {kl.k}) weight, not {self.weight.shape}")
        if kl is not None and (kl.row_scale.dtype != jnp.float32 or kl.row_scale.shape[-1] != kl.padded_shape[0]):
            raise ValueError(
                f"{name}: kernel_layout.row_scale must be float32 with one entry per laid-out row "
                f"({kl.padded_shape[0]}), got {kl.row_scale.dtype}{tuple(kl.row_scale.shape)}"
            )
        return self


jax.tree_util.register_dataclass(
    Fp4LinearParams, data_fields=["weight", "input_scale", "bias", "kernel_layout"], meta_fields=["recipe"]
)


def make_params(
    weight: QuantizedTensor,
    recipe: Recipe,
    *,
    input_scale: jax.Array | float | None = None,
    bias: jax.Array | None = None,
) -> Fp4LinearParams:
    """Build and validate :class:`Fp4LinearParams` (``input_scale`` per the module docstring)."""
    s = None if input_scale is None else jnp.asarray(input_scale, jnp.float32).reshape(())
    return Fp4LinearParams(weight=weight, input_scale=s, bias=bias, recipe=recipe).validate()


def fusion_blocker(parts: Sequence[Fp4LinearParams]) -> str | None:
    """Why layers reading the same input cannot be fused into one exact layer (``None``: they can).

    Fusing along N is exact when the recipe, K, weight encoding and activation scale agree: each
    part keeps its own global scale per output row, and the activations are quantized once with
    the shared scale. Activation scales are compared by value (concrete arrays: at load time)."""
    first = parts[0]
    for p in parts[1:]:
        if p.recipe != first.recipe:
            return f"recipes differ ({first.recipe.name}, {p.recipe.name})"
        w, v = first.weight, p.weight
        if (w.format, w.k, w.global_kind, w.negative_zero) != (v.format, v.k, v.global_kind, v.negative_zero):
            return "weight formats, K or global-scale conventions differ"
        if first.input_scale is not None and not bool(jnp.all(first.input_scale == p.input_scale)):
            return "activation scales differ (quantizing the shared input once would change the numbers)"
    return None


def concat_params(parts: Sequence[Fp4LinearParams]) -> Fp4LinearParams:
    """One layer computing ``concat([x @ W_i.T + b_i for i], -1)`` exactly: weights stacked along N
    (q/k/v, gate/up), each part's global scale kept per output row; a missing bias is zeros where
    another part has one. The result has no kernel layout (run ``prepare_weights`` on it).
    Raises ``ValueError`` saying why when :func:`fusion_blocker` finds a reason."""
    if why := fusion_blocker(parts):
        raise ValueError(f"cannot fuse these layers: {why}")
    return Fp4LinearParams(
        weight=concat_partitions([p.weight for p in parts]),
        input_scale=parts[0].input_scale,
        bias=concat_biases([p.bias for p in parts], [p.weight.n for p in parts]),
        recipe=parts[0].recipe,
    ).validate("fused layer")


def concat_biases(biases: Sequence[jax.Array | None], sizes: Sequence[int]) -> jax.Array | None:
    """The biases of layers fused along N, one vector: ``None`` if none has one, else each in the
    first present bias's dtype, zeros (``sizes[i]`` of them) where a layer has none."""
    dt = next((b.dtype for b in biases if b is not None), None)
    if dt is None:
        return None
    return jnp.concatenate([jnp.zeros((n,), dt) if b is None else b.astype(dt) for b, n in zip(biases, sizes, strict=True)])
