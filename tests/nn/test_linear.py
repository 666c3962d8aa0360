"""Flax layers: NNX and linen agree bit for bit; jit, nnx.jit, vmap and scan; any leading rank."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxfp4
import jaxfp4.nn.linear
from jaxfp4.nn import Fp4Linear, Fp4LinearLinen, QuantizedParam


def _dense(k=64, n=48, seed=0):
    return nnx.Linear(k, n, rngs=nnx.Rngs(seed), param_dtype=jnp.bfloat16)


@pytest.mark.parametrize(
    ("recipe", "scale"),
    [
        (jaxfp4.NVFP4W4A16(), None),
        (jaxfp4.NVFP4W4A4(), 400.0),
        (jaxfp4.NVFP4W4A4(jaxfp4.ActivationQuant.COMPRESSED_TENSORS), 400.0),
        (jaxfp4.MXFP4W4A16(), None),
        (jaxfp4.MXFP4W4A8(), 0.01),
    ],
)
def test_nnx_linen_jit_eager_bitwise(recipe, scale):
    layer = Fp4Linear.from_dense(_dense(), recipe=recipe, input_scale=scale)
    x = jax.random.normal(jax.random.key(1), (3, 5, 64), jnp.float32).astype(jnp.bfloat16)
    eager = layer(x)
    assert eager.shape == (3, 5, 48) and eager.dtype == jnp.bfloat16
    jitted = nnx.jit(lambda m, x: m(x))(layer, x)
    lin = Fp4LinearLinen(layer.params())
    via_linen = jax.jit(lambda x: lin.apply({}, x))(x)
    functional = jax.jit(jaxfp4.fp4_linear)(x, layer.params())
    for other in (jitted, via_linen, functional):
        assert np.array_equal(np.asarray(eager), np.asarray(other))


def test_dtypes_vmap_scan_and_filter():
    layer = Fp4Linear.from_dense(_dense(), recipe=jaxfp4.NVFP4W4A16())
    for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
        assert layer(jnp.ones((2, 64), dt)).dtype == dt
    x = jax.random.normal(jax.random.key(2), (4, 7, 64), jnp.bfloat16)
    v = jax.vmap(lambda xi: layer(xi))(x)
    assert np.array_equal(np.asarray(v), np.asarray(layer(x)))

    def body(c, xi):
        return c, layer(xi)

    _, s = jax.lax.scan(body, 0, x)
    assert np.array_equal(np.asarray(s), np.asarray(layer(x)))
    q = nnx.state(layer, QuantizedParam)
    assert len(jax.tree.leaves(q)) == 3  # codes, scales, global scale


def test_from_dense_matches_dense_within_fp4_error_and_bias_kept():
    dense = _dense()
    layer = Fp4Linear.from_dense(dense, recipe=jaxfp4.NVFP4W4A16(), encoder="modelopt")
    x = jax.random.normal(jax.random.key(3), (16, 64), jnp.float32).astype(jnp.bfloat16)
    y, yd = np.asarray(layer(x), np.float32), np.asarray(dense(x), np.float32)
    rel = np.linalg.norm(y - yd) / np.linalg.norm(yd)
    assert 0.01 < rel < 0.2  # NVFP4 weight error is ~10% relative; 0 would mean nothing was quantized


def test_bad_input_errors():
    with pytest.raises(ValueError, match="needs input_scale"):
        Fp4Linear.from_dense(_dense(), recipe=jaxfp4.NVFP4W4A4())
    with pytest.raises(ValueError, match="not a multiple of the block size 16"):
        Fp4Linear.from_dense(_dense(k=40), recipe=jaxfp4.NVFP4W4A16())
    layer = Fp4Linear.from_dense(_dense(), recipe=jaxfp4.NVFP4W4A16())
    with pytest.raises(ValueError, match="in_features=64"):
        layer(jnp.ones((2, 32), jnp.bfloat16))
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        layer(jnp.ones((2, 64), jnp.int32))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        jaxfp4.fp4_linear(jnp.ones((2, 64), jnp.bfloat16), layer.params(), backend="cuda")
    p = layer.params()
    bad = jaxfp4.QuantizedTensor(
        p.weight.codes.astype(jnp.int8),
        p.weight.scales,
        p.weight.global_scale,
        p.weight.format,
        p.weight.shape,
        p.weight.partitions,
        p.weight.global_kind,
    )
    with pytest.raises(TypeError, match="packed codes must be uint8"):
        jaxfp4.make_params(bad, jaxfp4.NVFP4W4A16())
    with pytest.raises(ValueError, match="needs mxfp4 weights"):
        jaxfp4.make_params(p.weight, jaxfp4.MXFP4W4A16())


def test_docstring_example_runs():
    assert doctest.testmod(jaxfp4.nn.linear, extraglobs={"nnx": nnx}).failed == 0
