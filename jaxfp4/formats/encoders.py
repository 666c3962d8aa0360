"""Weight encoders: dense weights -> :class:`QuantizedTensor`, reproducing each producer's bytes.

Two NVFP4 recipes exist and differ (global-scale precision, zero blocks, sign of zero), so both
are offered by name:

* :func:`quantize_nvfp4_llmcompressor` — llm-compressor 0.14 / compressed-tensors 0.19
  (``memoryless_minmax`` observer, ``nvfp4-pack-quantized``): global scale is a bf16-precision
  **divisor** ``bf16(bf16(1/amax) * 2688)``; block scale ``e4m3(g * dtype(amax16 / 6))``,
  0 -> 0.125; codes by dividing with ``f32(s / g)``; sign from ``signbit``.
* :func:`quantize_nvfp4_modelopt` — NVIDIA ModelOpt 0.47 export: global scale is an fp32
  **multiplier** ``amax / 2688``; block scale ``e4m3(clamp(amax16 / (6 * g), 2**-9, 448))``,
  0 -> 1.0; codes by dividing with ``f32(s * g)``; sign from ``x < 0``.

and :func:`quantize_mxfp4_llmcompressor` for compressed-tensors' MXFP4 (``mxfp4-pack-quantized``).

``amax`` of a fused group (q/k/v, gate/up) is the max over the group: pass the group's parts
together to get the producer's shared global scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxfp4.formats import codecs
from jaxfp4.formats.tensor import FP4Format, GlobalScale, QuantizedTensor, concat_partitions

_E2M1_X_E4M3 = codecs.E2M1_MAX * codecs.E4M3_MAX  # 2688


def _check_weight(w: jax.Array, block: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"weight must be a float array, got {w.dtype}")
    if w.shape[1] % block:
        raise ValueError(f"K={w.shape[1]} is not a multiple of the block size {block}")


def _group_amax(wf: jax.Array, block: int) -> jax.Array:
    n, k = wf.shape
    return codecs.abs_max(wf.reshape(n, k // block, block))


def _fp4_codes_from(scaled: jax.Array, n: int, k: int) -> jax.Array:
    return codecs.pack_nibbles(codecs.encode_e2m1(jnp.clip(scaled, -6.0, 6.0)).reshape(n, k))


def quantize_nvfp4_llmcompressor(parts: Sequence[jax.Array] | jax.Array) -> QuantizedTensor:
    """llm-compressor's NVFP4 weight quantization of one weight or a fused group of weights.

    Each part is ``(N_i, K)`` in its model dtype (bf16 for the verified recipe; arithmetic that
    torch does in the weight dtype is rounded to that dtype here too). The group shares one
    global scale (llm-compressor's ``FUSED_LAYER_NAMES``), stored once per partition.
    """
    parts = [parts] if isinstance(parts, jax.Array) else list(parts)
    for p in parts:
        _check_weight(p, 16)
    dt = parts[0].dtype
    amax = jnp.max(jnp.stack([jnp.max(jnp.abs(p.astype(jnp.float32))) for p in parts]))
    # generate_gparam: 2688 / amax, done in the weight dtype as reciprocal() then multiply.
    gs = codecs.round_to(codecs.round_to(codecs.div_exact(jnp.float32(1.0), amax), dt) * jnp.float32(_E2M1_X_E4M3), dt)
    out = []
    for p in parts:
        n, k = p.shape
        wf = p.astype(jnp.float32)
        local = codecs.round_to(codecs.div_exact(_group_amax(wf, 16), jnp.float32(6.0)), dt)
        s = codecs.encode_e4m3(gs * local)
        s = jnp.where(codecs.decode_e4m3(s) == 0, jnp.float8_e4m3fn(0.125), s)
        eff = codecs.div_exact(codecs.decode_e4m3(s), gs)
        scaled = codecs.div_exact(wf.reshape(n, k // 16, 16), eff[..., None])
        out.append(
            QuantizedTensor(
                codes=_fp4_codes_from(scaled, n, k),
                scales=s,
                global_scale=gs.reshape(1),
                format=FP4Format.NVFP4,
                shape=(n, k),
                partitions=(n,),
                global_kind=GlobalScale.DIVISOR,
            )
        )
    return out[0] if len(out) == 1 else concat_partitions(out)


def quantize_nvfp4_modelopt(parts: Sequence[jax.Array] | jax.Array) -> QuantizedTensor:
    """ModelOpt's NVFP4 weight export (``NVFP4_DEFAULT_CFG``) of one weight or a fused group.

    The group's ``weight_scale_2`` is ``f32(amax_group) / 2688`` (a multiplier); E2M1 code 8
    decodes to +0.0 in ModelOpt's own dequantizer, recorded as ``negative_zero=False``.
    """
    parts = [parts] if isinstance(parts, jax.Array) else list(parts)
    for p in parts:
        _check_weight(p, 16)
    amax = jnp.max(jnp.stack([jnp.max(jnp.abs(p.astype(jnp.float32))) for p in parts]))
    ws2 = codecs.div_exact(amax, jnp.float32(_E2M1_X_E4M3))
    out = []
    for p in parts:
        n, k = p.shape
        wf = p.astype(jnp.float32)
        pbs = codecs.div_exact(_group_amax(wf, 16), jnp.float32(6.0) * ws2)
        pbs = jnp.where(pbs == 0, jnp.float32(1.0), pbs)
        s = jnp.clip(pbs, jnp.float32(2.0**-9), jnp.float32(448.0)).astype(jnp.float8_e4m3fn)
        eff = codecs.decode_e4m3(s) * ws2
        scaled = jnp.clip(codecs.div_exact(wf.reshape(n, k // 16, 16), eff[..., None]), -6.0, 6.0)
        mag = codecs.encode_e2m1(jnp.abs(scaled))
        codes = mag | ((scaled < 0).astype(jnp.uint8) << 3)
        out.append(
            QuantizedTensor(
                codes=codecs.pack_nibbles(codes.reshape(n, k)),
                scales=s,
                global_scale=ws2.reshape(1),
                format=FP4Format.NVFP4,
                shape=(n, k),
                partitions=(n,),
                global_kind=GlobalScale.MULTIPLIER,
                negative_zero=False,
            )
        )
    return out[0] if len(out) == 1 else concat_partitions(out)


def mxfp4_scale_exponent_llmcompressor(amax: jax.Array) -> jax.Array:
    """compressed-tensors' E8M0 block exponent for a block max ``amax`` (a bf16 value).

    ``amax`` is rounded **up** to the next power of two when its bf16 mantissa is >= 0.75
    (adding ``1 << 5`` to the bf16 bits carries into the exponent), then 2 is subtracted
    (E2M1's largest exponent): ``e = clamp(exp_field - 2, 0, 255)``; a zero block gets 0.
    """
    bits = jax.lax.bitcast_convert_type(amax.astype(jnp.bfloat16), jnp.uint16).astype(jnp.int32)
    exp_field = ((bits + (1 << 5)) >> 7) & 0xFF
    return jnp.where(exp_field == 0, 0, jnp.clip(exp_field - 2, 0, 255)).astype(jnp.uint8)


def quantize_mxfp4_llmcompressor(w: jax.Array) -> QuantizedTensor:
    """compressed-tensors 0.19's MXFP4 weight quantization: E8M0 exponent per 32 along K from
    :func:`mxfp4_scale_exponent_llmcompressor`, codes ``RNE_E2M1(clamp(w / 2**(e-127), +-6))``."""
    _check_weight(w, 32)
    n, k = w.shape
    wf = w.astype(jnp.float32)
    e = mxfp4_scale_exponent_llmcompressor(_group_amax(wf, 32))
    scaled = codecs.ldexp_f32(wf.reshape(n, k // 32, 32), -codecs.e8m0_exponent(e)[..., None])
    return QuantizedTensor(
        codes=_fp4_codes_from(scaled, n, k),
        scales=e,
        global_scale=None,
        format=FP4Format.MXFP4,
        shape=(n, k),
        partitions=(n,),
        global_kind=GlobalScale.NONE,
    )
