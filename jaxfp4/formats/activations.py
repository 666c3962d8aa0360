"""Run-time activation quantization: NVFP4 (W4A4) and static per-tensor FP8 E4M3 (W4A8).

Inputs are ``[..., K]`` arrays in bf16, fp16 or float32; blocks run along the last axis.

NVFP4, with ``g`` the static global **divisor** (compressed-tensors ``input_global_scale``, or
``1/input_scale`` for ModelOpt/Quark), in two named modes (:class:`ActivationQuant`):

* ``VLLM`` (vLLM ``ref_nvfp4_quant`` / ``ref_nvfp4_quant_dequant``, CPU branch)::

    SF  = e4m3(clamp(f32(g * f32(amax16 * f32(1/6))), +-448))
    out = rcp(f32(SF * rcp(g)))            # rcp(v) = 1 / (v + (v == 0) * 1e8)
    q   = E2M1_RNE(clamp(f32(x * out), +-6))
    x_dq = dtype(f32(q * f32(SF / g)))

* ``COMPRESSED_TENSORS`` (compressed-tensors fake-quant, what HF transformers runs)::

    SF  = e4m3(clamp(f32(g * dtype(amax16 / 6)), +-448)); SF == 0 -> 0.125
    eff = f32(SF / g)
    q   = E2M1_RNE(clamp(f32(x / eff), +-6))
    x_dq = dtype(f32(q * eff))

Special values (both modes): a NaN anywhere in a 16-block makes that block's scale NaN and its
16 outputs NaN; +-inf saturates to +-6 times the block scale (the block's other elements are
quantized against a 448 scale, so they mostly become 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxfp4.formats import codecs
from jaxfp4.formats.tensor import ActivationQuant

NVFP4_BLOCK = 16
FLOAT_ACTIVATION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _check_act(x: jax.Array, block: int) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_ACTIVATION_DTYPES:
        raise TypeError(f"activations must be bfloat16, float16 or float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % block:
        raise ValueError(f"activation K={x.shape[-1] if x.ndim else None} is not a multiple of {block}")


class _Ops(NamedTuple):
    """The operations whose exactness depends on where the math runs: ``div`` (IEEE float32
    division), ``barrier`` (hides a value from XLA's algebraic simplifier) and ``round`` (float32
    rounded to an activation dtype, returned as float32). Under XLA: :func:`codecs.div_exact`,
    ``lax.optimization_barrier`` and :func:`codecs.round_to`. Inside a Pallas kernel (no XLA
    simplifier runs there): the backend's quotient corrected exactly, no barrier, and
    :func:`codecs.round_to_in_kernel` (Pallas's Triton lowering has no ``reduce_precision``)."""

    div: Callable[[jax.Array, jax.Array], jax.Array]
    barrier: Callable[[jax.Array], jax.Array]
    round: Callable[[jax.Array, jnp.dtype], jax.Array]


XLA_OPS = _Ops(codecs.div_exact, jax.lax.optimization_barrier, codecs.round_to)


KERNEL_OPS = _Ops(codecs.div_rn_in_kernel, lambda v: v, codecs.round_to_in_kernel)


def _vllm_rcp(v: jax.Array, ops: _Ops) -> jax.Array:
    """vLLM's ``get_reciprocal``: ``1 / (v + (v == 0) * 1e8)`` in float32.

    The barrier keeps XLA from folding a later ``x * rcp(v)`` into ``x / v`` (another rounding).
    """
    r = ops.div(jnp.float32(1.0), v + (v == 0).astype(jnp.float32) * jnp.float32(1e8))
    return ops.barrier(r)


def _nvfp4_blocks(
    x: jax.Array, global_scale: jax.Array, mode: ActivationQuant, ops: _Ops = XLA_OPS
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shared core: returns (E2M1 codes ``uint8 [..., K]``, scales ``e4m3 [..., K/16]``,
    float32 per-block dequant factor ``[..., K/16]``). ``ops``: see :class:`_Ops` (the
    Pallas kernel of :mod:`jaxfp4.kernels.act_triton` runs this same function)."""
    _check_act(x, NVFP4_BLOCK)
    g = jnp.asarray(global_scale, jnp.float32).reshape(())
    k = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = codecs.abs_max(xb).astype(jnp.float32)  # NaN in a block -> NaN scale, as torch
    xf = xb.astype(jnp.float32)
    if mode is ActivationQuant.VLLM:
        # f32(1/6), as torch. The barrier stops XLA's algebraic simplifier from re-associating
        # g * (amax * c) into amax * (g * c) under jit (a different rounding in ~0.3% of blocks).
        local = ops.barrier(amax * jnp.float32(1.0 / 6.0))
        sf = codecs.encode_e4m3(g * local)
        sf_f = codecs.decode_e4m3(sf)  # from the bits: no convert pair for XLA to fold
        scaled = xf * _vllm_rcp(sf_f * _vllm_rcp(g, ops), ops)[..., None]
        dq = ops.div(sf_f, g)
    elif mode is ActivationQuant.COMPRESSED_TENSORS:
        local = ops.round(ops.div(amax, jnp.float32(6.0)), x.dtype)
        sf = codecs.encode_e4m3(g * local)
        sf = jnp.where(codecs.decode_e4m3(sf) == 0, jnp.float8_e4m3fn(0.125), sf)
        dq = ops.div(codecs.decode_e4m3(sf), g)
        scaled = ops.div(xf, dq[..., None])
    else:
        raise ValueError(f"unknown activation quantization mode {mode!r}")
    codes = codecs.encode_e2m1(jnp.clip(scaled, -6.0, 6.0)).reshape(x.shape)
    return codes, sf, dq


def quantize_nvfp4_activations(
    x: jax.Array, global_scale: jax.Array, *, mode: ActivationQuant = ActivationQuant.VLLM
) -> tuple[jax.Array, jax.Array]:
    """NVFP4-quantize activations: (packed codes ``uint8 [..., K/2]``, scales ``e4m3 [..., K/16]``).

    ``global_scale`` is the float32 divisor ``g`` (see module docstring).
    """
    codes, sf, _ = _nvfp4_blocks(x, global_scale, mode)
    return codecs.pack_nibbles(codes), sf


def fake_quantize_nvfp4_activations(
    x: jax.Array, global_scale: jax.Array, *, mode: ActivationQuant = ActivationQuant.VLLM, ops: _Ops = XLA_OPS
) -> jax.Array:
    """Quantize then dequantize activations to NVFP4; returns ``x_dq`` in ``x.dtype``.
    (``ops``: :data:`KERNEL_OPS` inside a Pallas kernel, see :class:`_Ops`.)"""
    codes, _, dq = _nvfp4_blocks(x, global_scale, mode, ops)
    q = codecs.decode_e2m1(codes).reshape(*x.shape[:-1], -1, NVFP4_BLOCK)
    return (q * dq[..., None]).reshape(x.shape).astype(x.dtype)


def quantize_fp8_static(x: jax.Array, input_scale: jax.Array, *, ops: _Ops = XLA_OPS) -> jax.Array:
    """Static per-tensor FP8: ``e4m3(clamp(dtype(x / input_scale), +-448))``.

    ``input_scale`` is a multiplier (``x ~ fp8 * input_scale``). The quotient is rounded to the
    activation dtype before the FP8 cast, as torch does for a bf16 ``x`` and a 0-d scale (Quark,
    vLLM): a double rounding that changes ~2% of codes against a direct float32 cast.
    (``ops``: :data:`KERNEL_OPS` inside a Pallas kernel, see :class:`_Ops`.)
    """
    _check_act(x, 1)
    s = jnp.asarray(input_scale).astype(jnp.float32).reshape(())
    q = ops.round(ops.div(x.astype(jnp.float32), s), x.dtype)
    return codecs.encode_e4m3(q)


def fake_quantize_fp8_static(x: jax.Array, input_scale: jax.Array) -> jax.Array:
    """``dtype(f32(fp8) * input_scale)`` of :func:`quantize_fp8_static` (Quark/vLLM QDQ)."""
    s = jnp.asarray(input_scale).astype(jnp.float32).reshape(())
    return (codecs.decode_e4m3(quantize_fp8_static(x, input_scale)) * s).astype(x.dtype)
