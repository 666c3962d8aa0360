"""Bit-level codecs for the element and scale formats of NVFP4 and MXFP4.

All functions are pure ``jax.numpy`` and jit-compatible. Conventions (see NUMERICS.md):

* **E2M1** (FP4) code = ``sign << 3 | mag``; ``mag`` indexes ``[0, .5, 1, 1.5, 2, 3, 4, 6]``.
  Code 8 is -0.0. Identical to ``ml_dtypes.float4_e2m1fn``.
* **Packing**: two E2M1 codes per byte along K; element ``2j`` sits in the **low** nibble of
  byte ``j``, element ``2j + 1`` in the high nibble. Byte ``0x21`` decodes to ``[0.5, 1.0]``.
* **E4M3** (``float8_e4m3fn``): max 448, no infinity, ``0x7F``/``0xFF`` are NaN. Values are
  clamped to +-448 before the cast, because XLA/ml_dtypes overflow to NaN where torch saturates.
* **E8M0** (``float8_e8m0fnu``), kept as the raw ``uint8`` biased exponent ``e``: value
  ``2**(e - 127)``; ``0xFF`` is NaN (OCP MX spec). Decoded with exponent arithmetic, never a cast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127
E8M0_NAN = 0xFF

#: E2M1 code -> value, code 8 is -0.0.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def div_exact(a: jax.Array, b: jax.Array) -> jax.Array:
    """IEEE float32 ``a / b`` rounded to nearest even, on every backend; broadcasts like ``jnp.divide``.

    Two things stand between ``/`` and that. XLA's algebraic simplifier rewrites a division by a
    constant or a broadcast into a multiplication by its reciprocal (another rounding): the
    optimization barrier hides the divisor. And XLA:GPU lowers float32 division to PTX
    ``div.full.f32`` (about 2 ulp; measured on the H100: 27% of random quotients differ from
    numpy), so off the CPU the backend's quotient is corrected to the IEEE one with integer
    arithmetic (:func:`div_rn_corrected`), which no pass rewrites. XLA:CPU's division is IEEE and
    is kept there.
    """
    return jax.lax.platform_dependent(
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), cpu=_div_ieee, default=div_rn_corrected
    )


def _div_ieee(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` by the backend's division, the divisor hidden behind a barrier at full shape (so
    that no division by a broadcast becomes a multiplication by its reciprocal). Only for
    XLA:CPU, where materializing the broadcast divisor costs little; elsewhere a barrier on a
    broadcast array writes it out in full (e.g. a scalar FP8 scale over 4096 x 14336 activations:
    +74 us on the H100)."""
    a, b = jnp.broadcast_arrays(a, b)
    return a / jax.lax.optimization_barrier(b)


def _f32_fields(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 ``x`` -> (its bits ``uint32``, biased exponent ``int32``, 24-bit significand with
    the hidden bit ``uint32``; meaningful for normal numbers)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return bits, ((bits >> 23) & 0xFF).astype(jnp.int32), (bits & 0x7FFFFF) | 0x800000


def div_rn_corrected(a: jax.Array, b: jax.Array) -> jax.Array:
    """Float32 ``a / b``, correctly rounded: the backend's quotient, corrected with integer
    arithmetic (any backend whose float32 division is within 32 ulp for normal operands and
    results; XLA:GPU's ``div.full.f32`` is within 2).

    About 40 operations per element where :func:`div_rn_integer`'s long division takes ~150 (on
    the H100 it made the FP8 activation quantization of 4096 x 14336 bf16 values compute-bound
    at ~450 us). Zeros, infinities, NaNs, subnormal operands and results outside float32's
    normal range take the backend's ``/`` as in :func:`div_rn_integer`.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return _div_correct(a, b, a / jax.lax.optimization_barrier(b))


def div_rn_in_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`div_rn_corrected` for code inside a Pallas kernel: no optimization barrier (no XLA
    simplifier runs there, and none can be lowered), and a constant numerator is first made a
    traced value of ``b``'s shape (``where`` on ``b``, equal to ``a`` everywhere): Pallas's
    Triton lowering cannot bitcast a constant."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    a = jnp.where(b == b, a, a)
    return _div_correct(a, b, a / b)


def _div_correct(a: jax.Array, b: jax.Array, q0: jax.Array) -> jax.Array:
    """``RN(a / b)`` from a candidate ``q0`` within 32 ulp of it (normal operands and results;
    the others take ``q0``, which must then be the backend's ``a / b``).

    With ``ma``, ``mb`` the 24-bit significands, the exact quotient's binade is known from the
    operands (``[1, 2)`` times ``2**(ea - eb)`` if ``ma >= mb``, else ``[1/2, 1)``), so in units of
    that binade's ulp the quotient is ``t = ma * 2**s / mb`` with ``s = 23 + (ma < mb)``, in
    ``[2**23, 2**24)``. ``n0`` = the candidate in the same units; ``R = ma * 2**s - n0 * mb =
    (t - n0) * mb`` is small (``|R| < 2**31``), so its low 32 bits, which uint32 arithmetic gets
    exactly by wrapping, are all of it. ``k`` = the integer nearest ``R / mb`` (a float estimate
    truncated toward zero, so within 1 of it: no rounding primitive, which Pallas's Triton
    lowering lacks; then fixed exactly by the sign of ``2 (R - k mb) -+ mb``; never a tie: a quotient of
    24-bit significands is never halfway between two 24-bit ones at these ``s``), and the
    result's significand is ``n0 + k``, in ``[2**23, 2**24 - 1]`` (``t <= 2**24 - 1``, so the
    rounding never carries into the next binade)."""
    ia, ea, ma = _f32_fields(a)
    ib, eb, mb = _f32_fields(b)
    _, e0, m0 = _f32_fields(q0)
    low = ma < mb
    e = ea - eb + 127 - low.astype(jnp.int32)  # the exact quotient's biased exponent
    s = jnp.where(low, jnp.uint32(24), jnp.uint32(23))
    d = e0 - e  # the candidate's binade relative to the quotient's: -1, 0 or 1 when near it
    n0 = jnp.where(d > 0, m0 << 1, jnp.where(d < 0, m0 >> 1, m0))
    r = jax.lax.bitcast_convert_type((ma << s) - n0 * mb, jnp.int32)  # exact: |R| < 2**31
    mbi = mb.astype(jnp.int32)
    k = (r.astype(jnp.float32) / mbi.astype(jnp.float32)).astype(jnp.int32)  # truncated: within 1
    r1 = r - k * mbi  # exact; 2 * r1 in (-3 mb, 3 mb)
    k = k + (2 * r1 > mbi).astype(jnp.int32) - (2 * r1 < -mbi).astype(jnp.int32)
    n = n0.astype(jnp.int32) + k  # in [2**23, 2**24 - 1]
    bits = ((ia ^ ib) & jnp.uint32(0x80000000)) | ((e.astype(jnp.uint32) << 23) + (n - (1 << 23)).astype(jnp.uint32))
    ok = (ea > 0) & (ea < 255) & (eb > 0) & (eb < 255) & (e > 0) & (e < 255) & (jnp.abs(d) <= 1)
    return jnp.where(ok, jax.lax.bitcast_convert_type(bits, jnp.float32), q0)


def div_rn_integer(a: jax.Array, b: jax.Array) -> jax.Array:
    """Float32 ``a / b``, correctly rounded, with integer arithmetic (any backend): no float
    division at all, for a backend whose division is too far off for :func:`div_rn_corrected`,
    and an independent check of it in the tests. (``div_exact`` used it off the CPU until it
    proved compute-bound on the H100.)

    The 24-bit significands are divided by restoring long division (25 quotient bits plus a
    sticky remainder, all in ``uint32``) and rounded to nearest even; the exponent is the
    difference of the operands'. Zeros, infinities, NaNs, subnormal operands and results outside
    float32's normal range take the backend's ``/`` (exact for zeros, infinities and NaNs).
    """
    # No broadcast_arrays: the integer steps broadcast as they go, so a scalar divisor stays a
    # scalar (XLA fuses it into the elementwise loop instead of writing it out at full shape).
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    ia, ea, ma = _f32_fields(a)
    ib, eb, mb = _f32_fields(b)
    # q = floor(ma * 2**25 / mb), in [2**24, 2**26): ma / mb is in (1/2, 2).
    q = (ma >= mb).astype(jnp.uint32)
    r = ma - q * mb
    for _ in range(25):
        r = r << 1
        bit = (r >= mb).astype(jnp.uint32)
        r = r - bit * mb
        q = (q << 1) | bit
    wide = q >= (1 << 25)  # ma >= mb: 26 quotient bits, else 25
    mant = jnp.where(wide, q >> 2, q >> 1)
    half = jnp.where(wide, (q >> 1) & 1, q & 1)
    sticky = jnp.where(wide, q & 1, 0) | (r != 0).astype(jnp.uint32)
    mant = mant + (half & (sticky | (mant & 1)))
    e = ea - eb + jnp.where(wide, 127, 126) + (mant >> 24).astype(jnp.int32)
    mant = jnp.where(mant >> 24 != 0, mant >> 1, mant)
    bits = ((ia ^ ib) & jnp.uint32(0x80000000)) | (e.astype(jnp.uint32) << 23) | (mant & 0x7FFFFF)
    exact = jax.lax.bitcast_convert_type(bits, jnp.float32)
    ok = (ea > 0) & (ea < 255) & (eb > 0) & (eb < 255) & (e > 0) & (e < 255)
    # The barrier sits on the divisor before any broadcast (none is written out); a division by
    # a broadcast may then become a multiplication by the reciprocal, which is still exact for
    # the zeros, infinities and NaNs this fallback promises.
    return jnp.where(ok, exact, a / jax.lax.optimization_barrier(b))


def abs_max(x: jax.Array, axis: int = -1) -> jax.Array:
    """``max(|x|)`` along ``axis``, NaN where any element is NaN (as ``torch.amax``).

    ``jnp.max`` alone is not enough: XLA:CPU's vectorized max reduction drops NaNs under jit
    (jax 0.10.2: the block maxima of a ``(4, 256, 16)`` array with a NaN in a block came out
    finite, while a ``(4, 16)`` one gave NaN), so the NaN test is explicit.
    """
    a = jnp.abs(x)
    nan = jnp.max(jnp.isnan(a).astype(jnp.int32), axis=axis) > 0  # (a max: Pallas Triton has no reduce_or)
    return jnp.where(nan, jnp.asarray(jnp.nan, a.dtype), jnp.max(a, axis=axis))


def round_to(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Round float32 ``x`` to ``dtype`` (RNE) and return it as float32: torch's op-in-dtype rounding.

    ``x.astype(dtype).astype(float32)`` is not enough under jit: XLA:CPU's YNN (XNNPACK) fusions
    drop the pair even with ``--xla_allow_excess_precision=false`` (seen: ``amax / 6`` rounded to
    bf16 inside a block-max fusion came out unrounded in 65% of blocks). ``reduce_precision`` is an
    explicit HLO op no pass removes; it flushes float16 subnormals, so those (|x| < 2**-14) are
    rounded on the subnormal grid (multiples of 2**-24) with an exact power-of-two rescale.
    Overflow gives +-inf and NaN stays NaN, as the cast does.
    """
    x = jnp.asarray(x, jnp.float32)
    dt = jnp.dtype(dtype)
    if dt == jnp.float32:
        return x
    if dt == jnp.bfloat16:
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if dt == jnp.float16:
        normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
        sub = jnp.round(x * jnp.float32(2.0**24)) * jnp.float32(2.0**-24)
        return jnp.where(jnp.abs(x) < jnp.float32(2.0**-14), sub, normal)
    raise TypeError(f"round_to: unsupported dtype {dt}")


def round_to_in_kernel(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """:func:`round_to` for code inside a Pallas kernel, whose Triton lowering has no
    ``reduce_precision``: bfloat16 by integer round-half-to-even on the float32 bits (add
    ``0x7FFF`` plus the kept part's lowest bit, clear the low 16 bits; subnormals round on the same
    grid, overflow goes to +-inf, NaN stays NaN), float16 by the cast pair (no XLA pass runs inside
    a kernel to fold it)."""
    x = jnp.asarray(x, jnp.float32)
    dt = jnp.dtype(dtype)
    if dt == jnp.float32:
        return x
    if dt == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        r = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) & jnp.uint32(0xFFFF0000)
        return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(r, jnp.float32))
    if dt == jnp.float16:
        return x.astype(jnp.float16).astype(jnp.float32)
    raise TypeError(f"round_to_in_kernel: unsupported dtype {dt}")


def decode_e2m1(codes: jax.Array, *, negative_zero: bool = True) -> jax.Array:
    """E2M1 codes (any unsigned int dtype, values 0..15) -> float32 values, exactly.

    Built from the bits with one select (no table gather, so it also runs inside Pallas
    kernels): for ``mag >= 2`` the float32 pattern is ``0x3F000000 + (mag << 22)`` (exponent
    ``e - 1 + 127``, mantissa bit ``mag & 1``); for ``mag < 2`` it is ``mag * 0x3F000000``
    (0 or 0.5). ``negative_zero=False`` decodes code 8 as +0.0 (NVIDIA ModelOpt's table); the
    default gives -0.0 like compressed-tensors, vLLM and ml_dtypes.
    """
    c = codes.astype(jnp.uint32)
    mag = c & 7
    bits = jnp.where(mag < 2, mag * jnp.uint32(0x3F000000), jnp.uint32(0x3F000000) + (mag << 22))
    sign = (c & 8) << 28
    if not negative_zero:
        sign = jnp.where(mag == 0, jnp.uint32(0), sign)
    return jax.lax.bitcast_convert_type(bits | sign, jnp.float32)


def encode_e2m1(x: jax.Array) -> jax.Array:
    """float values -> E2M1 codes (``uint8``, 0..15): round half to even, saturate at +-6.

    Computed with threshold comparisons (exact on every backend: XLA:GPU's f32 -> float4
    conversion disagrees with round-to-nearest-even on Hopper). The magnitude index is the number
    of rounding boundaries passed; a boundary is ``>=`` where the upper neighbour has the even
    mantissa: ties 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    The sign bit is ``signbit(x)``, so a negative value that rounds to zero gives code 8 (-0.0),
    as compressed-tensors' packer does; +-inf gives +-6; NaN gives code 0 or 8 (its sign bit).
    """
    x = jnp.asarray(x, jnp.float32)
    a = jnp.abs(x)
    mag = (
        (a > 0.25).astype(jnp.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0)
    ).astype(jnp.uint8)
    sign = (jax.lax.bitcast_convert_type(x, jnp.uint32) >> 31).astype(jnp.uint8)
    return mag | (sign << 3)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """``uint8`` codes ``[..., K]`` (K even) -> packed bytes ``[..., K/2]``.

    Element ``2j`` goes to the low nibble of byte ``j``, element ``2j + 1`` to the high nibble.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got shape {codes.shape}")
    c = codes.astype(jnp.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """Packed bytes ``[..., K/2]`` -> ``uint8`` codes ``[..., K]`` (low nibble first)."""
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed FP4 codes must be uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def interleave(even: jax.Array, odd: jax.Array) -> jax.Array:
    """Two arrays ``[..., J]`` of one dtype -> ``[..., 2J]`` with ``even`` at positions ``2j`` and
    ``odd`` at ``2j + 1`` (the inverse of splitting a byte's low and high nibble values).

    For 1- and 2-byte dtypes the pair is packed into one unsigned word of twice the width (low
    half = ``even``: bitcasts are little-endian, as NumPy's views are on every platform JAX runs
    on) and bitcast back, so that XLA writes whole words; a ``stack`` made XLA:GPU's
    dequantization fusion write single elements at about a third of the HBM bandwidth. Bits are
    moved, never converted: the result equals the ``stack`` form bit for bit.
    """
    if even.shape != odd.shape or even.dtype != odd.dtype:
        raise ValueError(f"interleave needs equal shapes and dtypes, got {even.shape} {even.dtype}, {odd.shape} {odd.dtype}")
    size = jnp.dtype(even.dtype).itemsize
    if size not in (1, 2):
        return jnp.stack([even, odd], axis=-1).reshape(*even.shape[:-1], even.shape[-1] * 2)
    half, word = (jnp.uint8, jnp.uint16) if size == 1 else (jnp.uint16, jnp.uint32)
    lo = jax.lax.bitcast_convert_type(even, half).astype(word)
    hi = jax.lax.bitcast_convert_type(odd, half).astype(word)
    packed = lo | (hi << (8 * size))
    return jax.lax.bitcast_convert_type(packed, even.dtype).reshape(*even.shape[:-1], even.shape[-1] * 2)


def encode_e4m3(x: jax.Array) -> jax.Array:
    """float32 -> ``float8_e4m3fn``: clamp to +-448, then round to nearest even.

    NaN stays NaN; +-inf saturates to +-448 (as torch's cast does). (The NaN is kept explicitly:
    in Pallas's Triton lowering a clamp returns the bound for a NaN.)
    """
    x = jnp.asarray(x, jnp.float32)
    return jnp.where(jnp.isnan(x), x, jnp.clip(x, -E4M3_MAX, E4M3_MAX)).astype(jnp.float8_e4m3fn)


def decode_e4m3(s: jax.Array) -> jax.Array:
    """``float8_e4m3fn`` (or its raw ``uint8`` bytes) -> float32, exactly, built from the bits.

    Not ``astype``: with XLA's default ``--xla_allow_excess_precision=true``, a float32 -> E4M3 ->
    float32 convert pair inside one program may be folded away (the FP8 rounding lost), and on the
    H100 the FP8-quantized activations of W4A8 / the NVFP4 activation scales came out different
    from the CPU's without the flag. Integer operations on the bytes are never folded: normals are
    ``(e + 120) << 23 | m << 20`` in float32 bits, subnormals ``m * 2**-9``, ``0x7F``/``0xFF`` NaN.
    """
    u = (s if s.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(s, jnp.uint8)).astype(jnp.uint32)
    e = (u >> 3) & 0xF
    m = u & 0x7
    normal = jax.lax.bitcast_convert_type(((u & 0x80) << 24) | ((e + 120) << 23) | (m << 20), jnp.float32)
    sub = m.astype(jnp.float32) * jnp.float32(2.0**-9) * jnp.where(u >= 0x80, jnp.float32(-1.0), jnp.float32(1.0))
    out = jnp.where(e == 0, sub, normal)
    return jnp.where((u & 0x7F) == 0x7F, jnp.float32(jnp.nan), out)


def decode_e8m0(e: jax.Array) -> jax.Array:
    """E8M0 biased exponents (``uint8``) -> float32 ``2**(e - 127)``; ``0xFF`` -> NaN.

    Built from the exponent bits: ``e >= 1`` is the normal float32 with exponent field ``e``;
    ``e == 0`` is 2**-127, the float32 subnormal ``0x00400000``.
    """
    if e.dtype == jnp.float8_e8m0fnu:
        e = jax.lax.bitcast_convert_type(e, jnp.uint8)
    if e.dtype != jnp.uint8:
        raise TypeError(f"E8M0 scales must be uint8 exponents, got {e.dtype}")
    u = e.astype(jnp.uint32)
    bits = jnp.where(u == 0, jnp.uint32(0x00400000), u << 23)
    bits = jnp.where(u == E8M0_NAN, jnp.uint32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def e8m0_exponent(e: jax.Array) -> jax.Array:
    """E8M0 byte -> unbiased int32 exponent ``e - 127`` (``0xFF`` gives 128)."""
    return e.astype(jnp.int32) - E8M0_BIAS


def ldexp_f32(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x * 2**exponent`` in float32 for exponents in [-127, 127], exact unless it underflows.

    Done as two multiplications by normal powers of two, so that neither factor is a
    float32 subnormal (XLA:CPU flushes subnormal *operands*; results are kept).
    """
    x = jnp.asarray(x, jnp.float32)
    exponent = exponent.astype(jnp.int32)
    half = exponent // 2
    rest = exponent - half

    def pow2(k: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(((k + 127).astype(jnp.uint32)) << 23, jnp.float32)

    return (x * pow2(half)) * pow2(rest)
