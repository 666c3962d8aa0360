"""Exhaustive and special-value tests of the E2M1, E4M3, E8M0 codecs and nibble packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxfp4.formats import codecs

ALL_E2M1 = np.arange(16, dtype=np.uint8)


def test_e2m1_decode_matches_ml_dtypes_for_all_16_codes():
    ours = np.asarray(codecs.decode_e2m1(jnp.asarray(ALL_E2M1)))
    # ml_dtypes float4 values for codes 0..15 (its bit encoding is the E2M1 code).
    ref = np.array([ml_dtypes.float4_e2m1fn(v) for v in codecs.E2M1_VALUES]).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))  # sign of zero included
    assert ours[8] == 0 and np.signbit(ours[8])


def test_e2m1_decode_positive_zero_variant():
    ours = np.asarray(codecs.decode_e2m1(jnp.asarray(ALL_E2M1), negative_zero=False))
    assert not np.signbit(ours[8])
    assert np.array_equal(ours[np.arange(16) != 8], codecs.E2M1_VALUES[np.arange(16) != 8])


def test_e2m1_encode_roundtrip_all_codes():
    assert np.array_equal(np.asarray(codecs.encode_e2m1(jnp.asarray(codecs.E2M1_VALUES))), ALL_E2M1)


@pytest.mark.parametrize(
    ("x", "want"),
    [
        (0.25, 0.0),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),
        (0.2500001, 0.5),
        (5.0000005, 6.0),
        (6.0, 6.0),
        (7.0, 6.0),
        (1e30, 6.0),
        (-0.75, -1.0),
        (-2.5, -2.0),
        (-5.0, -4.0),
        (-100.0, -6.0),
    ],
)
def test_e2m1_ties_to_even_and_saturation(x, want):
    got = codecs.decode_e2m1(codecs.encode_e2m1(jnp.float32(x)))
    assert float(got) == want


def test_e2m1_special_values():
    codes = np.asarray(codecs.encode_e2m1(jnp.array([jnp.inf, -jnp.inf, jnp.nan, -jnp.nan, -0.0, -0.1, 0.1])))
    # +-inf saturate to +-6 (codes 7, 15); NaN maps to a zero carrying its sign bit;
    # negative values rounding to zero keep the sign (code 8), like compressed-tensors' packer.
    assert codes.tolist() == [7, 15, 0, 8, 8, 8, 0]


def test_e2m1_encode_matches_ml_dtypes_on_random_values():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1_000_000) * rng.choice([0.1, 1.0, 4.0], 1_000_000)).astype(np.float32)
    x[:1000] = rng.choice(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32), 1000) * rng.choice([-1, 1], 1000)
    ours = np.asarray(codecs.encode_e2m1(jnp.asarray(x)))
    ref = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF  # ml_dtypes: RNE, saturating
    assert np.array_equal(ours, ref)


def test_nibble_order_pinned():
    # Element 2j is the low nibble: byte 0x21 holds [code 1, code 2] = [0.5, 1.0].
    vals = codecs.decode_e2m1(codecs.unpack_nibbles(jnp.array([0x21], jnp.uint8)))
    assert vals.tolist() == [0.5, 1.0]
    assert codecs.pack_nibbles(jnp.array([1, 2], jnp.uint8)).tolist() == [0x21]


def test_pack_unpack_roundtrip_and_matches_xla_bitcast():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(7, 64), dtype=np.uint8)
    packed = np.asarray(codecs.pack_nibbles(jnp.asarray(codes)))
    assert np.array_equal(np.asarray(codecs.unpack_nibbles(jnp.asarray(packed))), codes)
    # XLA's own float4 pair -> byte bitcast puts element 0 in the low nibble too.
    as_f4 = jnp.asarray(codecs.E2M1_VALUES[codes].astype(ml_dtypes.float4_e2m1fn).reshape(7, 32, 2))
    assert np.array_equal(np.asarray(jax.lax.bitcast_convert_type(as_f4, jnp.uint8)), packed)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float8_e4m3fn, jnp.bfloat16, jnp.float16, jnp.float32])
def test_interleave_equals_stack_bit_for_bit(dtype):
    """The word-packing form (1- and 2-byte dtypes) and the stack form give the same bits,
    including NaN payloads and -0.0 (bits are moved, never converted)."""
    rng = np.random.default_rng(2)
    size = jnp.dtype(dtype).itemsize
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]
    bits = rng.integers(0, np.iinfo(uint).max, size=(2, 5, 24), dtype=uint, endpoint=True)
    even, odd = (jax.lax.bitcast_convert_type(jnp.asarray(b), dtype) for b in bits)
    got = codecs.interleave(even, odd)
    want = np.stack([bits[0], bits[1]], axis=-1).reshape(5, 48)
    assert got.dtype == dtype and got.shape == (5, 48)
    assert np.array_equal(np.asarray(jax.lax.bitcast_convert_type(got, uint)), want)
    assert np.array_equal(np.asarray(jax.lax.bitcast_convert_type(jax.jit(codecs.interleave)(even, odd), uint)), want)


def test_pack_rejects_odd_and_unpack_rejects_non_uint8():
    with pytest.raises(ValueError, match="even"):
        codecs.pack_nibbles(jnp.zeros((3,), jnp.uint8))
    with pytest.raises(TypeError, match="uint8"):
        codecs.unpack_nibbles(jnp.zeros((3,), jnp.int8))


def test_e4m3_decode_all_256_bytes():
    b = np.arange(256, dtype=np.uint8)
    ours = np.asarray(codecs.decode_e4m3(jnp.asarray(b)))
    ref = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(ours, ref, equal_nan=True)
    assert np.isnan(ours[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(ours, [0x7F, 0xFF])).all()


def test_e4m3_encode_all_codes_ties_and_saturation():
    b = np.arange(256, dtype=np.uint8)
    vals = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = ~np.isnan(vals)
    back = np.asarray(codecs.encode_e4m3(jnp.asarray(vals[finite]))).view(np.uint8)
    assert np.array_equal(back, b[finite])
    # Midpoints between neighbours round to the even mantissa.
    pos = np.sort(vals[finite & (vals >= 0)])
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    got = np.asarray(codecs.encode_e4m3(jnp.asarray(mids))).astype(np.float32)
    lo_even = (np.asarray(codecs.encode_e4m3(jnp.asarray(pos[:-1]))).view(np.uint8) & 1) == 0
    assert np.array_equal(got, np.where(lo_even, pos[:-1], pos[1:]))
    # Saturation instead of ml_dtypes' NaN on overflow.
    sat = np.asarray(codecs.encode_e4m3(jnp.array([464.0, 1e9, jnp.inf, -jnp.inf, jnp.nan]))).astype(np.float32)
    assert sat[:4].tolist() == [448.0, 448.0, 448.0, -448.0] and np.isnan(sat[4])


def test_e8m0_decode_all_256_bytes():
    e = np.arange(256, dtype=np.uint8)
    ours = np.asarray(codecs.decode_e8m0(jnp.asarray(e)))
    want = np.ldexp(np.float64(1.0), e.astype(np.int64) - 127).astype(np.float32)
    assert np.array_equal(ours[:255], want[:255])
    assert np.isnan(ours[255])
    assert ours[0] == np.float32(2.0**-127)  # a float32 subnormal, built from bits


def test_ldexp_exact_over_range():
    x = jnp.asarray(codecs.E2M1_VALUES[1:8])
    for k in range(-120, 121, 7):
        got = np.asarray(codecs.ldexp_f32(x, jnp.int32(k)))
        assert np.array_equal(got, np.ldexp(codecs.E2M1_VALUES[1:8], k))


@pytest.mark.parametrize(
    "div", [codecs.div_exact, codecs.div_rn_integer, codecs.div_rn_corrected], ids=["div_exact", "integer", "corrected"]
)
def test_div_exact_is_ieee_division_for_normal_numbers(div):
    """Both the division used on this backend and the integer long division used off the CPU
    (run here on the CPU) == numpy's IEEE float32 quotient, bit for bit: 1M random bit patterns
    (every exponent, NaN/inf/zero included) and exact integer quotients, under jit (a float32
    quotient is never exactly halfway, so rounding is decided by the remainder). Subnormal operands
    or results go to the backend's ``/`` (XLA:CPU flushes them), so they are excluded here."""
    rng = np.random.default_rng(0)
    n = 1 << 20
    a = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    b = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ints = (rng.integers(1, 2**12, n) * rng.integers(1, 2**12, n)).astype(np.float32)
    den = rng.integers(1, 2**12, n).astype(np.float32)
    f = jax.jit(div)
    tiny = np.finfo(np.float32).tiny
    for x, y in ((a, b), (ints, den)):
        got = np.asarray(f(x, y))
        with np.errstate(all="ignore"):
            want = x / y
        keep = ~((np.abs(x) < tiny) & (x != 0)) & ~((np.abs(y) < tiny) & (y != 0)) & ~((np.abs(want) < tiny) & (want != 0))
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same[keep].all(), (x[keep & ~same][:4], y[keep & ~same][:4])
    assert np.asarray(f(jnp.float32(1.0), jnp.float32(0.0))) == np.inf
    assert np.asarray(f(jnp.float32(-0.0), jnp.float32(3.0))).view(np.uint32) == 0x80000000


def _normal_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random float32 bit patterns ``a``, ``b`` whose operands and numpy quotient are normal."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    b = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        q = a / b
    tiny, big = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    keep = (np.abs(a) >= tiny) & (np.abs(a) <= big) & (np.abs(b) >= tiny) & (np.abs(b) <= big)
    keep &= (np.abs(q) >= tiny) & (np.abs(q) <= big)
    return a[keep], b[keep], q[keep]


def test_div_correction_fixes_candidates_up_to_32_ulp_off():
    """The correction behind div_exact off the CPU, fed the exact quotient moved by -32..32 ulp
    (bit steps, so across binade edges too; on the CPU the backend's own quotient is exact and
    would test nothing): the IEEE quotient comes back, bit for bit, for ~1M pairs."""
    a, b, q = _normal_pairs(1 << 20, 1)
    off = np.random.default_rng(2).integers(-32, 33, q.size).astype(np.int64)
    bits = q.view(np.uint32).astype(np.int64)
    mag = (bits & 0x7FFFFFFF) + off  # a step away from zero on either sign
    keep = (mag > 0x00800000) & (mag < 0x7F800000)
    cand = ((bits & 0x80000000) | mag)[keep].astype(np.uint32).view(np.float32)
    got = np.asarray(jax.jit(codecs._div_correct)(a[keep], b[keep], cand))
    assert np.array_equal(got.view(np.uint32), q[keep].view(np.uint32))
    # At the top of the range: a candidate that overflowed to +inf (one step past max) is
    # corrected back to max; a quotient past the range keeps the backend's (documented).
    big = np.float32(np.finfo(np.float32).max)
    assert np.asarray(codecs._div_correct(big, np.float32(1.0), np.float32(np.inf))) == big
    assert np.isposinf(np.asarray(codecs._div_correct(big, np.float32(0.5), np.float32(np.inf))))


def test_div_rn_corrected_with_a_scalar_divisor_writes_no_full_size_divisor():
    """A scalar divisor (an FP8 activation scale) stays a scalar: equal to numpy bit for bit, and
    no optimization barrier at the activations' shape in the program (on the GPU one would be
    written out in full: +74 us at 4096 x 14336)."""
    a, _, _ = _normal_pairs(1 << 16, 3)
    s = np.float32(0.0173)
    with np.errstate(all="ignore"):
        want = a / s
    keep = np.isfinite(want) & (np.abs(want) >= np.finfo(np.float32).tiny)
    for div in (codecs.div_rn_corrected, codecs.div_rn_integer):
        got = np.asarray(jax.jit(div)(a, s))
        assert np.array_equal(got[keep].view(np.uint32), want[keep].view(np.uint32))
        text = jax.jit(div).lower(a, s).as_text()
        barriers = [ln for ln in text.splitlines() if "optimization_barrier" in ln]
        assert barriers and all(f"tensor<{a.size}x" not in ln for ln in barriers), barriers


def test_abs_max_keeps_nans_under_jit():
    """A NaN anywhere in a block gives that block a NaN maximum, as torch.amax does: under jit,
    XLA:CPU's vectorized max reduction alone returned finite maxima for a (4, 256, 16) array."""
    from jaxfp4.formats.activations import fake_quantize_nvfp4_activations

    x = np.random.default_rng(0).standard_normal((4, 256, 16)).astype(np.float32)
    x[1, 7, 14] = np.nan
    x[3, 0, 0] = -np.inf
    m = np.asarray(jax.jit(codecs.abs_max)(jnp.asarray(x)))
    want = np.abs(x).max(-1)
    assert np.isnan(m[1, 7]) and np.array_equal(np.isnan(m), np.isnan(want))
    assert np.array_equal(m[~np.isnan(m)], want[~np.isnan(want)])
    xq = jax.jit(fake_quantize_nvfp4_activations)(jnp.asarray(x.reshape(4, -1)), jnp.float32(300.0))
    blocks = np.asarray(xq).reshape(4, 256, 16)
    assert np.isnan(blocks[1, 7]).all() and np.isnan(blocks).sum() == 16
