"""Fusing layers that read the same input (q/k/v, gate/up) into one: ``concat_params``.

The claim is exactness: the fused weight dequantizes to the parts' weights stacked, bit for bit
(each part keeps its global scale per output row), the activations are quantized once with the
shared scale, so each output column is the same float32 dot product as before. Only the GEMM's
summation order may differ with the matrix width; outputs are compared against the separate
layers within the float32 re-association bound of tests/kernels/test_w4a16.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, MXFP4W4A16, NVFP4W4A4, NVFP4W4A16
from jaxfp4.ops import concat_params, fusion_blocker
from tests.kernels.test_w4a16 import _params

RECIPES = [NVFP4W4A16(), NVFP4W4A4(), MXFP4W4A16(), MXFP4W4A8()]


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
def test_fused_layer_equals_its_parts(recipe):
    parts = [_params(recipe, n, 256, seed=s, fused=True) for s, n in ((0, 96), (1, 32), (2, 64))]
    parts[1] = dataclasses.replace(parts[1], bias=None)  # a missing bias counts as zeros
    f = concat_params(parts)
    assert f.out_features == 192 and f.kernel_layout is None
    stacked = jnp.concatenate([jaxfp4.dequantize(p, dtype=jnp.float32) for p in parts])
    assert np.array_equal(np.asarray(jaxfp4.dequantize(f, dtype=jnp.float32)), np.asarray(stacked))
    x = jax.random.normal(jax.random.key(7), (5, 256), jnp.float32).astype(jnp.bfloat16)
    got = np.asarray(jaxfp4.fp4_linear(x, f, backend="xla"), np.float64)
    want = np.concatenate([np.asarray(jaxfp4.fp4_linear(x, p, backend="xla"), np.float64) for p in parts], -1)
    # same products, possibly another float32 summation order, then one bf16 rounding each:
    # within K * 2**-24 of sum|x w| plus one bf16 ulp of the result.
    xa = np.abs(np.asarray(x, np.float64))
    mag = xa @ np.abs(np.asarray(stacked, np.float64)).T + np.abs(want)
    assert np.all(np.abs(got - want) <= 256 * 2.0**-24 * mag + 2.0**-8 * np.abs(want))


def test_fusion_blocker_names_the_reason():
    a = _params(NVFP4W4A4(), 64, 128)
    assert fusion_blocker([a, a]) is None
    other_scale = dataclasses.replace(a, input_scale=jnp.float32(301.0))
    assert "activation scales differ" in fusion_blocker([a, other_scale])
    assert "recipes differ" in fusion_blocker([a, _params(NVFP4W4A16(), 64, 128)])
    assert "K" in fusion_blocker([a, _params(NVFP4W4A4(), 64, 256)])
    with pytest.raises(ValueError, match="cannot fuse these layers: activation scales differ"):
        concat_params([a, other_scale])
