"""Fused partitions (q/k/v, gate/up) whose global scales differ: jaxfp4 keeps one alpha per
partition (exact); vLLM reduces them to the max and does not rescale the block scales."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4.formats import concat_partitions, quantize_mxfp4_llmcompressor, quantize_nvfp4_llmcompressor, slice_rows


def test_per_partition_alpha_keeps_what_vllm_max_loses():
    kq, kk, kx = jax.random.split(jax.random.key(0), 3)
    # Two partitions quantized separately (as ModelOpt/Quark may store them): very different amax.
    wq = jax.random.normal(kq, (64, 128), jnp.float32).astype(jnp.bfloat16)
    wk = (jax.random.normal(kk, (32, 128), jnp.float32) * 40).astype(jnp.bfloat16)
    parts = [quantize_nvfp4_llmcompressor(wq), quantize_nvfp4_llmcompressor(wk)]
    fused = concat_partitions(parts)
    assert fused.partitions == (64, 32) and float(fused.global_scale[0]) != float(fused.global_scale[1])
    x = jax.random.normal(kx, (8, 128), jnp.float32).astype(jnp.bfloat16)

    # Exact reference: each partition with its own producer dequantization, in float64.
    w_exact = np.concatenate([np.asarray(jaxfp4.dequantize(p, jnp.float32), np.float64) for p in parts])
    ref = np.asarray(x, np.float64) @ w_exact.T

    ours = np.asarray(jaxfp4.fp4_linear(x, jaxfp4.make_params(fused, jaxfp4.NVFP4W4A16()), backend="xla"), np.float64)
    # vLLM: one global scale for the fused layer, the max of the partitions' divisors.
    g_max = jnp.full((2,), jnp.max(fused.global_scale), jnp.float32)
    vllm_like = dataclasses.replace(fused, global_scale=g_max)
    theirs = np.asarray(jaxfp4.fp4_linear(x, jaxfp4.make_params(vllm_like, jaxfp4.NVFP4W4A16()), backend="xla"), np.float64)

    def rel_err(y, cols):
        return np.linalg.norm(y[:, cols] - ref[:, cols]) / np.linalg.norm(ref[:, cols])

    for cols in (slice(0, 64), slice(64, 96)):
        # ours: only bf16 rounding of the weight and the output (2^-8 relative each, summed loosely)
        assert rel_err(ours, cols) < 2**-6
    # vLLM's max: the partition with the smaller divisor comes out scaled by g_small/g_max.
    g = np.asarray(fused.global_scale)
    small = slice(0, 64) if g[0] < g[1] else slice(64, 96)
    assert rel_err(theirs, small) > 0.5
    np.testing.assert_allclose(rel_err(theirs, small), 1 - g.min() / g.max(), rtol=0.05)


def test_slice_rows_keeps_each_partitions_global_scale():
    w = (jax.random.normal(jax.random.key(3), (96, 64), jnp.float32) * 0.1).astype(jnp.bfloat16)
    q = quantize_nvfp4_llmcompressor([w[:32], w[32:80] * 5, w[80:] * 0.1])  # partitions (32, 48, 16)
    full = np.asarray(jaxfp4.dequantize(q, jnp.float32))
    for lo, hi, parts in [(0, 96, (32, 48, 16)), (16, 48, (16, 16)), (40, 88, (40, 8)), (33, 34, (1,)), (80, 96, (16,))]:
        s = slice_rows(q, lo, hi)
        assert s.shape == (hi - lo, 64) and s.partitions == parts and s.global_scale.shape == (len(parts),)
        assert np.array_equal(np.asarray(jaxfp4.dequantize(s, jnp.float32)), full[lo:hi])
    mx = quantize_mxfp4_llmcompressor(w)
    assert np.array_equal(np.asarray(jaxfp4.dequantize(slice_rows(mx, 8, 72))), np.asarray(jaxfp4.dequantize(mx))[8:72])
    with pytest.raises(ValueError, match=r"\[90, 100\) is not inside a weight of 96 rows"):
        slice_rows(q, 90, 100)
