"""Every formats function gives the same bits under ``jax.jit`` as op by op.

XLA rewrites float arithmetic under jit in ways eager dispatch (one op per executable) never sees:
re-association of products with constants (``g * (amax * c)`` -> ``amax * (g * c)``) and, on CPU,
YNN fusions that drop a round trip through bf16/fp16 even with excess precision disallowed. Both
changed NVFP4 activation quantization in earlier versions; these tests pin them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxfp4.formats import activations, codecs, encoders
from jaxfp4.formats.tensor import ActivationQuant


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(_bits(x), _bits(y)) for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("fn", [codecs.round_to, codecs.round_to_in_kernel])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_round_to_matches_the_numpy_cast_under_jit(dtype, fn):
    """Random float32 bit patterns, float16 subnormals and rounding edges, infinities, NaN: both
    the XLA form and the in-kernel form (integer RNE for bfloat16) equal numpy's cast."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & ((np.abs(x) >= 2.0**-126) | (x == 0))]  # XLA:CPU flushes f32 subnormals
    tiny = (rng.standard_normal(1 << 16) * 1e-5).astype(np.float32)  # f16 subnormal range
    edges = np.array([65504, 65519.996, 65520, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 3.0 * 2.0**-26, 6.1e-5], np.float32)
    x = np.concatenate([x, tiny, edges, -edges, [np.inf, -np.inf, np.nan]]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(dtype).astype(np.float32)
    got = np.asarray(jax.jit(lambda a: fn(a, dtype))(x))
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_round_to_survives_a_block_max_fusion():
    """The shape of the bug: max over a block, divide, round to bf16, all in one jitted fusion."""
    w = (jax.random.normal(jax.random.key(1), (256, 512)) * 0.2).astype(jnp.bfloat16)

    def scale(a):
        amax = jnp.max(jnp.abs(a.astype(jnp.float32).reshape(256, 32, 16)), axis=-1)
        return codecs.round_to(codecs.div_exact(amax, jnp.float32(6.0)), jnp.bfloat16)

    amax = np.abs(np.asarray(w, np.float32)).reshape(256, 32, 16).max(-1)
    want = (amax / np.float32(6.0)).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(np.asarray(jax.jit(scale)(w)), want)


def _weights(seed: int, scale: float, dtype=jnp.bfloat16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (256, 512)) * scale).astype(dtype), (jax.random.normal(k2, (128, 512)) * 0.3).astype(dtype)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_encoders_jit_equals_eager(seed, dtype):
    w, w2 = _weights(seed, 0.02 * 10**seed, dtype)
    for enc in (
        lambda a, b: encoders.quantize_nvfp4_llmcompressor([a, b]),
        lambda a, b: encoders.quantize_nvfp4_modelopt([a, b]),
        lambda a, b: encoders.quantize_mxfp4_llmcompressor(a),
    ):
        assert _same(enc(w, w2), jax.jit(enc)(w, w2))


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("mode", list(ActivationQuant))
def test_nvfp4_activation_quant_jit_equals_eager(seed, dtype, mode):
    x, _ = _weights(seed, 0.02 * 10**seed, dtype)

    def fq(a, s):
        return activations.fake_quantize_nvfp4_activations(a, s, mode=mode)

    def q(a, s):
        return activations.quantize_nvfp4_activations(a, s, mode=mode)

    for g in (5.0, 400.0, 644.0, 0.37 * 10**seed):
        gs = jnp.float32(g)
        assert _same(fq(x, gs), jax.jit(fq)(x, gs)), g
        assert _same(q(x, gs), jax.jit(q)(x, gs)), g
        # the global scale as a compile-time constant takes other simplifier paths
        assert _same(fq(x, gs), jax.jit(lambda a, gs=gs: fq(a, gs))(x)), g


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_fp8_static_jit_equals_eager(dtype):
    x, _ = _weights(7, 3.0, dtype)
    for s in (0.01, 0.37, 2.5):
        f = activations.fake_quantize_fp8_static
        assert _same(f(x, jnp.float32(s)), jax.jit(f)(x, jnp.float32(s)))
