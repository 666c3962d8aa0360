"""mxfp4_as_e4m3: an MXFP4 weight as exact E4M3 values times one power of two, and when it says no.

The window it relies on (E2M1 times ``2**j`` exact in E4M3 exactly for ``j`` in [-8, 6]) is proved
exhaustively in tests/kernels/test_w4a8.py; here: the claim ``decode(w8) * 2**shift ==
dequantize(q)`` bit for bit whenever ``exact``, and ``exact`` false in each case it must be.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfp4.formats import (
    FP4Format,
    GlobalScale,
    QuantizedTensor,
    codecs,
    dequantize,
    mxfp4_as_e4m3,
    mxfp4_e4m3_bytes,
    mxfp4_e4m3_window,
    quantize_mxfp4_llmcompressor,
    quantize_nvfp4_llmcompressor,
)


def _mx(codes: np.ndarray, exps: np.ndarray) -> QuantizedTensor:
    n, kb = codes.shape
    return QuantizedTensor(
        jnp.asarray(codes, jnp.uint8),
        jnp.asarray(exps, jnp.uint8),
        None,
        FP4Format.MXFP4,
        (n, 2 * kb),
        (n,),
        GlobalScale.NONE,
    )


def _check_exact(q: QuantizedTensor, window: bool = True) -> None:
    w8, shift, exact = jax.jit(mxfp4_as_e4m3)(q)
    assert bool(exact)
    assert bool(mxfp4_e4m3_window(q)[1]) == window  # the scale-only test, or the per-value check
    assert w8.dtype == jnp.float8_e4m3fn and w8.shape == q.shape
    got = codecs.ldexp_f32(codecs.decode_e4m3(w8), jnp.broadcast_to(shift, q.shape))
    assert np.array_equal(np.asarray(got), np.asarray(dequantize(q, jnp.float32)))


@pytest.mark.parametrize("seed", [0, 1])
def test_quantized_weight_is_exact_in_e4m3_times_a_power_of_two(seed):
    w = jax.random.normal(jax.random.key(seed), (96, 512), jnp.float32) * 0.05
    _check_exact(quantize_mxfp4_llmcompressor(w.astype(jnp.bfloat16)))


def test_every_code_at_the_edges_of_the_window():
    """All 256 bytes in blocks whose exponents span exactly 14 binades (the widest that fits)."""
    rng = np.random.default_rng(3)
    codes = np.tile(np.arange(256, dtype=np.uint8), (4, 2))  # (4, 512): K = 1024, 32 blocks a row
    exps = rng.integers(100, 115, size=(4, 32)).astype(np.uint8)
    exps[0, 0], exps[1, 1] = 100, 114  # the spread is exactly 14 somewhere
    _check_exact(_mx(codes, exps))


def test_spread_over_14_binades_is_not_exact():
    codes = np.full((2, 64), 0x11, np.uint8)  # every element 0.5: nonzero everywhere
    exps = np.full((2, 4), 120, np.uint8)
    exps[1, 3] = 120 - 15
    assert not bool(mxfp4_as_e4m3(_mx(codes, exps))[2])
    exps[1, 3] = 120 - 14
    assert bool(mxfp4_e4m3_window(_mx(codes, exps))[1])


def test_zero_blocks_may_have_any_exponent():
    """Quark gives an all-zero block E8M0 code 1: it holds no value, so it cannot break exactness."""
    codes = np.full((2, 64), 0x77, np.uint8)
    codes[0, :16] = 0  # block 0 of row 0 is all zero
    exps = np.full((2, 4), 125, np.uint8)
    exps[0, 0] = 1
    _check_exact(_mx(codes, exps), window=False)


def test_large_values_below_the_window_can_still_be_exact():
    """Exactness is decided per value: 4 * 2**-10 = 2**-8 is exact even 16 binades down."""
    codes = np.full((1, 64), 0x66, np.uint8)  # 4.0 everywhere
    exps = np.array([[127, 127, 127, 127 - 16]], np.uint8)
    _check_exact(_mx(codes, exps), window=False)


def test_nan_scale_is_not_exact():
    exps = np.full((1, 4), 127, np.uint8)
    exps[0, 2] = codecs.E8M0_NAN
    assert not bool(mxfp4_as_e4m3(_mx(np.full((1, 64), 0x22, np.uint8), exps))[2])


def test_nvfp4_is_refused():
    q = quantize_nvfp4_llmcompressor(jnp.ones((16, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="MXFP4"):
        mxfp4_as_e4m3(q)


@pytest.mark.parametrize("negative_zero", [True, False])
def test_integer_expansion_equals_the_fp8_rounding_of_every_value(negative_zero):
    """Every code times every ``2**j`` from far below the window to its top: the integer bytes
    are the float32 -> E4M3 conversion of the exact value wherever that conversion is exact, and
    the exactness flag says precisely where (checked through ml_dtypes, not XLA)."""
    from jaxfp4.formats.tensor import _e2m1_as_e4m3_bits

    nib = np.repeat(np.arange(16, dtype=np.uint8), 23)
    j = np.tile(np.arange(-16, 7, dtype=np.int32), 16)
    bits, ok = jax.jit(_e2m1_as_e4m3_bits, static_argnums=2)(jnp.asarray(nib), jnp.asarray(j), negative_zero)
    vals = np.ldexp(np.asarray(codecs.decode_e2m1(jnp.asarray(nib), negative_zero=negative_zero), np.float64), j)
    f8 = vals.astype(np.float32).astype(jnp.float8_e4m3fn)
    want_ok = f8.astype(np.float64) == vals
    assert np.array_equal(np.asarray(ok), want_ok)
    assert want_ok.sum() > 200 and (~want_ok).sum() > 20  # both sides of the window are covered
    assert np.array_equal(np.asarray(bits)[want_ok], f8.view(np.uint8)[want_ok])


@pytest.mark.parametrize("negative_zero", [True, False])
def test_float_route_bytes_equal_the_integer_construction(negative_zero):
    """``mxfp4_e4m3_bytes`` (float32 values, XLA's FP8 conversion) against the integer bytes, for
    every byte in blocks spread over the window and below it, wherever the value is exact."""
    from jaxfp4.formats.tensor import _e2m1_as_e4m3_bits

    codes = np.tile(np.arange(256, dtype=np.uint8), (8, 2))  # (8, 512): 32 blocks a row
    exps = np.random.default_rng(5).integers(100, 125, size=(8, 32)).astype(np.uint8)
    q = dataclasses.replace(_mx(codes, exps), negative_zero=negative_zero)
    shift = mxfp4_e4m3_window(q)[0]
    got = np.asarray(jax.jit(mxfp4_e4m3_bytes)(q, shift)).view(np.uint8).reshape(8, 32, 32)
    j = (exps.astype(np.int32) - 127 - int(shift))[..., None]
    c = codes.reshape(8, 32, 16)
    for half, nib in enumerate((c & 0xF, c >> 4)):
        bits, ok = _e2m1_as_e4m3_bits(jnp.asarray(nib), jnp.asarray(j), negative_zero)
        ok = np.asarray(ok)
        assert ok.any() and not ok.all()  # both sides of the window
        assert np.array_equal(got[..., half::2][ok], np.asarray(bits)[ok])
