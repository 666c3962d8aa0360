"""The "xla" backend: pure jnp, runs on every JAX platform, and is the executable reference.

It follows vLLM's emulation path, with one alpha per fused partition instead of vLLM's max:

1. activations: W4A4 -> NVFP4 quantize-dequantize (``recipe.activation_mode``); W4A8 -> static
   FP8 quantize-dequantize; W4A16 -> unchanged;
2. weight: NVFP4 ``dtype(f32(q * f32(s * m_w)))`` with ``m_w`` the partition's multiplier
   (``1/g`` by IEEE division for divisors: vLLM's ``dequantize_to_dtype``); MXFP4
   ``dtype(q * 2**(e-127))``; ``dtype`` is the activation dtype;
3. ``y = x_dq @ W.T`` with float32 accumulation (+ bias in float32), returned in the activation dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxfp4.formats import (
    MXFP4W4A8,
    NVFP4W4A4,
    FP4Format,
    GlobalScale,
    QuantizedTensor,
    dequantize,
    fake_quantize_fp8_static,
    fake_quantize_nvfp4_activations,
)
from jaxfp4.ops.params import Fp4LinearParams

NAME = "xla"


def unsupported_reason(x: jax.Array, params: Fp4LinearParams) -> str | None:
    return None  # runs everywhere


def prepare_activations(x: jax.Array, params: Fp4LinearParams) -> jax.Array:
    """Step 1: the activations as the GEMM sees them (bit-exact with the reference)."""
    r = params.recipe
    if isinstance(r, NVFP4W4A4):
        return fake_quantize_nvfp4_activations(x, params.input_scale, mode=r.activation_mode)
    if isinstance(r, MXFP4W4A8):
        return fake_quantize_fp8_static(x, params.input_scale)
    return x


def gemm_weight(w: QuantizedTensor, dtype: jnp.dtype) -> jax.Array:
    """Step 2: the dequantized ``(N, K)`` weight fed to the GEMM (multiplier form for NVFP4)."""
    if w.format is FP4Format.MXFP4 or w.global_kind is GlobalScale.MULTIPLIER:
        return dequantize(w, dtype)
    as_mult = dataclasses.replace(w, global_scale=w.global_multiplier(), global_kind=GlobalScale.MULTIPLIER)
    return dequantize(as_mult, dtype)


def forward(
    x: jax.Array,
    params: Fp4LinearParams,
    bias: jax.Array | None,
    out_dtype: jnp.dtype,
    prefetch: Fp4LinearParams | None = None,
) -> jax.Array:
    del prefetch  # a GPU kernel's hint; XLA schedules its own memory traffic
    x_dq = prepare_activations(x, params)
    w = gemm_weight(params.weight, x.dtype)
    y = jax.lax.dot_general(x_dq, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
