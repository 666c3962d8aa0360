"""The quantized-weight pytree and the typed schemes (recipes) of jaxfp4.

A :class:`QuantizedTensor` holds one linear layer's FP4 weight exactly as the PyTorch producer
stored it (PyTorch's ``(out_features, in_features)`` = ``(N, K)`` orientation, never
transposed): packed E2M1 codes, block scales, and per-partition global scales with the
producer's own convention (divisor or multiplier). Keeping the stored numbers, rather than a
normalized copy, is what makes :func:`dequantize` bit-exact with each producer's decompression.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats import codecs


class FP4Format(enum.Enum):
    """Block format of the weight: element type E2M1, and the block scale's type and size."""

    NVFP4 = "nvfp4"  # E4M3 scale per 16 elements along K, plus an fp32 global scale
    MXFP4 = "mxfp4"  # E8M0 scale per 32 elements along K, no global scale

    @property
    def block_size(self) -> int:
        return 16 if self is FP4Format.NVFP4 else 32

    @property
    def scale_dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float8_e4m3fn) if self is FP4Format.NVFP4 else jnp.dtype(jnp.uint8)


class GlobalScale(enum.Enum):
    """How the stored per-tensor global scale ``g`` of an NVFP4 weight is applied."""

    NONE = "none"  # MXFP4: no global scale
    DIVISOR = "divisor"  # compressed-tensors: w = q * (s / g), g ~ 448*6/amax
    MULTIPLIER = "multiplier"  # ModelOpt, Quark: w = q * (s * g), g ~ amax/(448*6)


class ActivationQuant(enum.Enum):
    """Runtime NVFP4 activation quantization modes (W4A4); both are bit-exact to their source.

    * ``VLLM``: vLLM's ``ref_nvfp4_quant`` + ``ref_nvfp4_quant_dequant`` (CPU branch):
      ``amax/6`` as ``f32(amax * f32(1/6))``, quantize by multiplying with a reciprocal.
    * ``COMPRESSED_TENSORS``: compressed-tensors' fake-quant (what llm-compressor calibrates
      with and HF transformers runs): ``amax/6`` rounded to bf16, an all-zero block's scale
      becomes 0.125, quantize by dividing.
    """

    VLLM = "vllm"
    COMPRESSED_TENSORS = "compressed_tensors"


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One FP4 weight matrix of logical shape ``(N, K)`` (out_features, in_features).

    Array fields (pytree leaves):
      codes: ``uint8 [N, K/2]``, two E2M1 codes per byte along K; element ``2j`` in the low
        nibble of byte ``j``.
      scales: block scales along K. NVFP4: ``float8_e4m3fn [N, K/16]``; MXFP4: ``uint8 [N, K/32]``
        biased E8M0 exponents (value ``2**(e-127)``).
      global_scale: NVFP4 only, ``float32 [P]``: one stored global scale per output partition
        (e.g. q, k, v of a fused qkv weight), in the producer's convention ``global_kind``.
        ``None`` for MXFP4.

    Static fields (pytree metadata, hashable):
      format: :class:`FP4Format`.
      shape: logical ``(N, K)``.
      partitions: output-row counts of each partition, summing to N (``(N,)`` when unfused).
      global_kind: :class:`GlobalScale` convention of ``global_scale``.
      negative_zero: whether E2M1 code 8 decodes to -0.0 (compressed-tensors, vLLM) or +0.0
        (ModelOpt's decoder). Values are equal either way; this only pins the sign bit.
    """

    codes: jax.Array
    scales: jax.Array
    global_scale: jax.Array | None
    format: FP4Format
    shape: tuple[int, int]
    partitions: tuple[int, ...]
    global_kind: GlobalScale
    negative_zero: bool = True

    @property
    def block_size(self) -> int:
        return self.format.block_size

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return self.shape[1]

    def validate(self, name: str = "weight") -> QuantizedTensor:
        """Check dtypes and shapes (not values); raise one clear error naming ``name``."""
        validate_quantized(
            name,
            self.codes,
            self.scales,
            self.global_scale,
            format=self.format,
            shape=self.shape,
            partitions=self.partitions,
            global_kind=self.global_kind,
        )
        return self

    def global_multiplier(self) -> jax.Array | None:
        """Per-partition float32 multiplier ``m_w`` (``[P]``): ``1/g`` for divisors (one fp32
        division), ``g`` for multipliers, ``None`` for MXFP4."""
        if self.global_kind is GlobalScale.NONE:
            return None
        g = self.global_scale.astype(jnp.float32)
        return codecs.div_exact(jnp.float32(1.0), g) if self.global_kind is GlobalScale.DIVISOR else g

    def row_global_multiplier(self) -> jax.Array | None:
        """``m_w`` expanded to one float32 per output row (``[N]``), or ``None`` for MXFP4."""
        m = self.global_multiplier()
        if m is None:
            return None
        return repeat_per_row(m, self.partitions, self.n)


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["codes", "scales", "global_scale"],
    meta_fields=["format", "shape", "partitions", "global_kind", "negative_zero"],
)


def validate_quantized(
    name: str,
    codes: jax.Array,
    scales: jax.Array,
    global_scale: jax.Array | None,
    *,
    format: FP4Format,
    shape: tuple[int, int],
    partitions: Sequence[int],
    global_kind: GlobalScale,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` if the parts do not form a weight."""
    n, k = shape
    bs = format.block_size
    if k % bs:
        raise ValueError(f"{name}: K={k} is not a multiple of the {format.value} block ({bs})")
    if codes.dtype != jnp.uint8:
        raise TypeError(f"{name}: packed codes must be uint8, got {codes.dtype}")
    if tuple(codes.shape) != (n, k // 2):
        raise ValueError(f"{name}: packed codes have shape {tuple(codes.shape)}, expected {(n, k // 2)}")
    if scales.dtype != format.scale_dtype:
        raise TypeError(f"{name}: {format.value} block scales must be {format.scale_dtype}, got {scales.dtype}")
    if tuple(scales.shape) != (n, k // bs):
        raise ValueError(f"{name}: block scales have shape {tuple(scales.shape)}, expected {(n, k // bs)}")
    if sum(partitions) != n or any(p <= 0 for p in partitions):
        raise ValueError(f"{name}: partitions {tuple(partitions)} do not sum to N={n}")
    if format is FP4Format.MXFP4:
        if global_scale is not None or global_kind is not GlobalScale.NONE:
            raise ValueError(f"{name}: MXFP4 weights carry no global scale")
        return
    if global_kind is GlobalScale.NONE or global_scale is None:
        raise ValueError(f"{name}: NVFP4 weights need a global scale (divisor or multiplier)")
    if global_scale.dtype != jnp.float32:
        raise TypeError(f"{name}: global scale must be float32, got {global_scale.dtype}")
    if tuple(global_scale.shape) != (len(partitions),):
        raise ValueError(
            f"{name}: global scale has shape {tuple(global_scale.shape)}, expected one per partition ({len(partitions)},)"
        )


def repeat_per_row(v: jax.Array, partitions: tuple[int, ...], n: int) -> jax.Array:
    """Per-partition values ``[P]`` repeated per output row ``[n]``; no gather when already per
    row (the layout of column-parallel shards, see :mod:`jaxfp4.sharding`)."""
    if len(partitions) == n:
        return v
    return jnp.repeat(v, np.asarray(partitions), total_repeat_length=n)


def _nibbles_by_block(q: QuantizedTensor) -> tuple[jax.Array, jax.Array]:
    """The packed codes per byte, grouped by scale block: (low nibbles = even elements, high
    nibbles = odd elements), each ``uint8 [N, K/B, B/2]``."""
    n, k = q.shape
    c = q.codes.reshape(n, k // q.block_size, q.block_size // 2)
    return c & 0xF, c >> 4


def _block_shifts(q: QuantizedTensor, shift: jax.Array) -> jax.Array:
    """Each MXFP4 block's exponent minus ``shift``, clipped to [-64, 64] (beyond any E4M3 use):
    int32 ``[N, K/32, 1]``."""
    return jnp.clip(codecs.e8m0_exponent(q.scales) - shift, -64, 64)[..., None]


def dequantize(q: QuantizedTensor, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """The ``(N, K)`` weight in ``dtype``, bit-exact with the producer's own decompression.

    ``q`` is a :class:`QuantizedTensor` or anything holding one as ``.weight`` (a layer's
    ``Fp4LinearParams``, e.g. ``load_checkpoint(...).quantized[module]``).

    * NVFP4, divisor (compressed-tensors ``NVFP4PackedCompressor.decompress``):
      ``dtype(f32(q * f32(s / g)))``.
    * NVFP4, multiplier (ModelOpt ``NVFP4QTensor.dequantize``, Quark):
      ``dtype(f32(q * f32(s * g)))``.
    * MXFP4 (compressed-tensors, Quark, gpt-oss): ``dtype(q * 2**(e-127))`` (the product is
      exact in float32; one rounding to ``dtype``). E8M0 ``0xFF`` gives NaN.

    ``g`` is the partition's global scale, applied per output row. Limit: XLA:CPU flushes
    float32 subnormal *results* to zero, so MXFP4 values below 2**-126 (E8M0 exponent bytes 0
    and 1 only) come out as zero on CPU where torch keeps a subnormal.
    """
    if not isinstance(q, QuantizedTensor):
        q = getattr(q, "weight", q)
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize needs a QuantizedTensor or layer params holding one, got {type(q).__name__}")
    n, k = q.shape
    pair = [codecs.decode_e2m1(v, negative_zero=q.negative_zero) for v in _nibbles_by_block(q)]
    if q.format is FP4Format.MXFP4:
        e = codecs.e8m0_exponent(q.scales)[..., None]
        nan = (q.scales == codecs.E8M0_NAN)[..., None]
        pair = [jnp.where(nan, jnp.nan, codecs.ldexp_f32(v, e)) for v in pair]
    else:
        s = codecs.decode_e4m3(q.scales)
        g = repeat_per_row(q.global_scale.astype(jnp.float32), q.partitions, n)
        eff = codecs.div_exact(s, g[:, None]) if q.global_kind is GlobalScale.DIVISOR else s * g[:, None]
        pair = [v * eff[..., None] for v in pair]
    return codecs.interleave(*(v.astype(dtype) for v in pair)).reshape(n, k)


# E2M1 values times 2**j are exact in E4M3 for j in [-8, 6] (6 * 2**6 = 384 <= 448; 0.5 * 2**-8 is
# E4M3's smallest subnormal): tests/kernels/test_w4a8.py proves it exhaustively.
E4M3_TOP_SHIFT = 6


def mxfp4_e4m3_window(q: QuantizedTensor) -> tuple[jax.Array, jax.Array]:
    """The cheap half of :func:`mxfp4_as_e4m3`, from the block scales alone: ``(shift, ok)``.

    ``shift`` (int32 scalar) maps the largest block exponent's E2M1 6 to ``6 * 2**6``; ``ok``
    (bool scalar) says every block exponent lies within 14 binades below it and no scale is NaN,
    which makes every value exact in E4M3 (sufficient, not necessary: see ``mxfp4_as_e4m3``)."""
    if q.format is not FP4Format.MXFP4:
        raise ValueError(f"mxfp4_as_e4m3 needs an MXFP4 weight, got {q.format.value}")
    nan = q.scales == codecs.E8M0_NAN
    e = codecs.e8m0_exponent(q.scales)  # [N, K/32]; 0xFF (NaN) -> 128
    shift = jnp.max(jnp.where(nan, -(1 << 20), e)) - E4M3_TOP_SHIFT
    return shift, jnp.all((e - shift >= -8) & ~nan)


def mxfp4_e4m3_bytes(q: QuantizedTensor, shift: jax.Array) -> jax.Array:
    """``float8_e4m3fn [N, K]``: each value of ``q`` divided by ``2**shift``, converted to E4M3.

    Exact (and equal to the integer construction of ``_e2m1_as_e4m3_bits``, tested) for every
    value that E4M3 holds; others are rounded and must not be used (``mxfp4_as_e4m3`` says
    which). Built as E2M1 decoded to float32, times a power of two (exact in float32), then XLA's
    float32 -> FP8 conversion: on the H100 this ran at 68 us for 4096 x 14336 where the integer
    construction took 88 (kernels/results/fp8-gemm-probe-*.json)."""
    j = _block_shifts(q, shift)
    pair = [codecs.decode_e2m1(v, negative_zero=q.negative_zero) for v in _nibbles_by_block(q)]
    return codecs.interleave(*(codecs.ldexp_f32(v, j).astype(jnp.float8_e4m3fn) for v in pair)).reshape(q.shape)


def mxfp4_as_e4m3(q: QuantizedTensor) -> tuple[jax.Array, jax.Array, jax.Array]:
    """An MXFP4 weight re-expressed for an FP8 E4M3 GEMM, exactly when possible.

    Returns ``(w8, shift, exact)``: ``w8`` ``float8_e4m3fn [N, K]``, ``shift`` an int32 scalar
    and ``exact`` a bool scalar, such that ``decode(w8) * 2**shift == dequantize(q, float32)``
    element for element whenever ``exact`` is true. One shift serves the whole tensor (so an FP8
    GEMM can take it as a scalar): the largest block exponent maps E2M1's 6 to ``6 * 2**6``.
    ``exact`` is decided per value: a value that would fall below E4M3's range (a block exponent
    more than 14 binades under the top, unless the value is large enough or zero) or a NaN scale
    makes it false. The per-value check runs only when the scale-only test of
    :func:`mxfp4_e4m3_window` fails (``lax.cond``). All traced: under ``jit`` the caller
    branches on ``exact``.
    """
    shift, window = mxfp4_e4m3_window(q)

    def per_value(q: QuantizedTensor) -> jax.Array:
        j = _block_shifts(q, shift)
        oks = [_e2m1_as_e4m3_bits(v, j, q.negative_zero)[1] for v in _nibbles_by_block(q)]
        return jnp.all(oks[0] & oks[1]) & ~jnp.any(q.scales == codecs.E8M0_NAN)

    exact = jax.lax.cond(window, lambda q: jnp.bool_(True), per_value, q)
    return mxfp4_e4m3_bytes(q, shift), shift, exact


def _e2m1_as_e4m3_bits(nib: jax.Array, j: jax.Array, negative_zero: bool) -> tuple[jax.Array, jax.Array]:
    """E2M1 codes ``nib`` (0..15) times ``2**j`` -> (E4M3 bytes ``uint8``, exact ``bool``), with
    integer operations only (XLA:GPU ran the float32 -> FP8 conversion route at a third of HBM
    bandwidth).

    A nonzero magnitude is ``(1 + f/2) * 2**t0`` (``0.5`` is ``1.0 * 2**-1``); times ``2**j`` its
    exponent is ``t = t0 + j``. E4M3 (bias 7, 3 mantissa bits) stores it as a normal number for
    ``t >= -6`` (exponent field ``t + 7``, mantissa ``f << 2``) and below that as a subnormal
    ``(2 + f) * 2**(t + 8)`` units of ``2**-9``, which is whole (exact) for ``t >= -8`` and for
    ``t == -9`` when ``f == 0``. Bytes of inexact values are unspecified; zero is always exact
    (``-0`` when ``negative_zero``, matching :func:`codecs.decode_e2m1`).
    """
    c = nib.astype(jnp.int32)
    mag = c & 7
    f = jnp.where(mag >= 2, mag & 1, 0)
    t = jnp.where(mag >= 2, (mag >> 1) - 1, -1) + j
    normal = ((t + 7) << 3) | (f << 2)
    sub = ((2 + f) << jnp.clip(t + 9, 0, 2)) >> 1
    bits = jnp.where(mag == 0, 0, jnp.where(t >= -6, normal, sub)) & 0x7F
    sign = (c & 8) << 4
    if not negative_zero:
        sign = jnp.where(mag == 0, 0, sign)
    exact = (mag == 0) | (t > -9) | ((t == -9) & (f == 0))
    return (bits | sign).astype(jnp.uint8), exact


def concat_partitions(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Fuse weights along N (q/k/v, gate/up), keeping each part's own global scale exactly."""
    first = parts[0]
    for p in parts[1:]:
        if (p.format, p.k, p.global_kind, p.negative_zero) != (
            first.format,
            first.k,
            first.global_kind,
            first.negative_zero,
        ):
            raise ValueError("cannot fuse weights of different formats, K or global-scale conventions")
    gs = None if first.global_scale is None else jnp.concatenate([p.global_scale for p in parts])
    return QuantizedTensor(
        codes=jnp.concatenate([p.codes for p in parts]),
        scales=jnp.concatenate([p.scales for p in parts]),
        global_scale=gs,
        format=first.format,
        shape=(sum(p.n for p in parts), first.k),
        partitions=tuple(x for p in parts for x in p.partitions),
        global_kind=first.global_kind,
        negative_zero=first.negative_zero,
    )


def slice_rows(q: QuantizedTensor, lo: int, hi: int) -> QuantizedTensor:
    """Output rows ``lo .. hi-1`` of ``q`` as a self-contained weight ``(hi - lo, K)``, exact: the
    partitions the range cuts keep their own global scales (so slices of fused weights can be
    re-fused in another order, see :func:`jaxfp4.sharding.fuse_columns`)."""
    if not 0 <= lo < hi <= q.n:
        raise ValueError(f"row range [{lo}, {hi}) is not inside a weight of {q.n} rows")
    parts, which, start = [], [], 0
    for i, size in enumerate(q.partitions):
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            parts.append(b - a)
            which.append(i)
        start += size
    gs = None if q.global_scale is None else q.global_scale[np.asarray(which)]
    return dataclasses.replace(
        q, codes=q.codes[lo:hi], scales=q.scales[lo:hi], global_scale=gs, shape=(hi - lo, q.k), partitions=tuple(parts)
    )


# --------------------------------------------------------------------------------------------
# Recipes: what a layer computes. Typed, hashable, usable as static jit arguments.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NVFP4W4A4:
    """NVFP4 weights; activations quantized to NVFP4 at run time with a static global divisor
    ``input_global_scale`` (per-16 E4M3 block scales computed on the fly)."""

    activation_mode: ActivationQuant = ActivationQuant.VLLM
    weight_format = FP4Format.NVFP4
    name = "nvfp4_w4a4"


@dataclasses.dataclass(frozen=True)
class NVFP4W4A16:
    """NVFP4 weights; activations stay bf16/fp16/f32 (no synthesized activation scale)."""

    weight_format = FP4Format.NVFP4
    name = "nvfp4_w4a16"


@dataclasses.dataclass(frozen=True)
class MXFP4W4A8:
    """MXFP4 weights; activations FP8 E4M3 with a static per-tensor scale (a multiplier:
    ``x ~ fp8 * input_scale``)."""

    weight_format = FP4Format.MXFP4
    name = "mxfp4_w4a8"


@dataclasses.dataclass(frozen=True)
class MXFP4W4A16:
    """MXFP4 weights; activations stay in their float dtype (gpt-oss)."""

    weight_format = FP4Format.MXFP4
    name = "mxfp4_w4a16"


Recipe = NVFP4W4A4 | NVFP4W4A16 | MXFP4W4A8 | MXFP4W4A16
RECIPES: tuple[type, ...] = (NVFP4W4A4, NVFP4W4A16, MXFP4W4A8, MXFP4W4A16)
