"""The "pallas" backend's large-M path (jaxfp4.ops.pallas.dense_forward): the weight expanded once,
then XLA's tensor-core GEMM (bf16, or FP8 for MXFP4 W4A8), against the "xla" reference.

Tolerance: the derived bound of tests/kernels/test_w4a16.py (``_check_against_reference``). For
W4A16 / W4A4 the path is the reference's own arithmetic up to summation order (float32), well
inside it; for W4A8 the activation scale moves to the float32 epilogue, as in the kernels. On the
GPU the FP8 GEMM accumulates in float32 (``kernels/results/prefill-probe-*.json``: max error
1.7e-8 of the sum of |products| at K = 8192), inside the bound's ``K * 2**-24`` term.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, FP4Format, QuantizedTensor
from jaxfp4.ops import pallas, pallas_interpret
from tests.conftest import requires_gpu
from tests.kernels.test_w4a16 import RECIPES, _check_against_reference, _params


def _spread_out(p):
    """The MXFP4 weight with one block exponent 20 binades lower: not exact in E4M3 any more."""
    w: QuantizedTensor = p.weight
    return dataclasses.replace(p, weight=dataclasses.replace(w, scales=w.scales.at[0, 0].add(jnp.uint8(256 - 20))))


def _run(x, p, dense_from: int, interpret: bool):
    limits = {"bf16": dense_from, "fp8": dense_from}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pallas, "DENSE_MIN_M", limits)
        mp.setattr(pallas, "WS_MIN_M", 1 << 62)  # no warp-specialized kernel form to keep the rows
        assert pallas.uses_dense(x.size // x.shape[-1], "fp8" if isinstance(p.recipe, MXFP4W4A8) else "bf16", p)
        if interpret:
            with pallas_interpret():
                return jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"))(x, p)
        return jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p))(x, p)


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
@pytest.mark.parametrize(("lead", "n", "k"), [((3,), 96, 160), ((2, 17), 40, 256)])
def test_dense_path_matches_xla_on_cpu(recipe, lead, n, k):
    if k % recipe.weight_format.block_size:
        pytest.skip("K must be a multiple of the MXFP4 block (32)")
    p = _params(recipe, n, k, fused=recipe.weight_format is FP4Format.NVFP4)
    x = jax.random.normal(jax.random.key(7), (*lead, k), jnp.float32).astype(jnp.bfloat16)
    _check_against_reference(x, p, _run(x, p, 1, interpret=True))


def test_w4a8_falls_back_to_bf16_when_the_weight_does_not_fit_e4m3():
    p = _params(MXFP4W4A8(), 64, 256)
    bad = _spread_out(p)
    assert bool(jaxfp4.formats.mxfp4_as_e4m3(p.weight)[2]) and not bool(jaxfp4.formats.mxfp4_as_e4m3(bad.weight)[2])
    x = jax.random.normal(jax.random.key(8), (9, 256), jnp.float32).astype(jnp.bfloat16)
    y = _run(x, bad, 1, interpret=True)
    _check_against_reference(x, bad, y)
    assert not np.array_equal(np.asarray(y), np.asarray(_run(x, p, 1, interpret=True)))  # the weight did change


def test_w4a8_outside_the_window_but_exact_keeps_fp8():
    """An all-zero block with a tiny exponent fails the scale-only window test; the per-value
    check finds the weight exact, and the result is the in-window weight's, bit for bit."""
    p = _params(MXFP4W4A8(), 64, 256)
    w: QuantizedTensor = p.weight
    zeroed = dataclasses.replace(w, codes=w.codes.at[3, :16].set(0))
    p_in = dataclasses.replace(p, weight=zeroed)
    p_out = dataclasses.replace(p, weight=dataclasses.replace(zeroed, scales=zeroed.scales.at[3, 0].set(jnp.uint8(1))))
    fmts = jaxfp4.formats
    assert not bool(fmts.mxfp4_e4m3_window(p_out.weight)[1]) and bool(fmts.mxfp4_as_e4m3(p_out.weight)[2])
    x = jax.random.normal(jax.random.key(9), (9, 256), jnp.float32).astype(jnp.bfloat16)
    y = _run(x, p_out, 1, interpret=True)
    _check_against_reference(x, p_out, y)
    assert np.array_equal(np.asarray(y), np.asarray(_run(x, p_in, 1, interpret=True)))


def test_small_m_keeps_the_fp4_kernels():
    assert not pallas.uses_dense(pallas.DENSE_MIN_M["bf16"] - 1) and pallas.uses_dense(pallas.DENSE_MIN_M["bf16"])
    p = jaxfp4.prepare_weights(_params(RECIPES[0], 64, 256))
    assert not pallas.uses_mgpu(p, pallas.DENSE_MIN_M["bf16"])  # the dense path takes over from there


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
def test_large_m_stays_on_the_warp_specialized_kernel(recipe):
    """bf16 activations (W4A16, W4A4) at prefill sizes stay on the Mosaic GPU kernel where its
    warp-specialized form serves them (128-row tiles, enough units); W4A8 keeps its FP8 GEMM,
    and an N without 128-row tiles the dense path."""
    p = jaxfp4.prepare_weights(_params(recipe, 4096, 1024))
    fp8 = isinstance(recipe, MXFP4W4A8)
    acts = "fp8" if fp8 else "bf16"
    with pallas.tuned_override([]):
        for m in (pallas.DENSE_MIN_M[acts], 4096):
            assert pallas.uses_mgpu(p, m, acts) != fp8 and pallas.uses_dense(m, acts, p) == fp8
        odd = jaxfp4.prepare_weights(_params(recipe, 4096 - 64, 1024))
        assert pallas.uses_dense(4096, acts, odd) and not pallas.uses_mgpu(odd, 4096, acts)
        if not fp8:  # float32 outputs: where their tiles leave the warp-specialized form no room, dense
            ws32 = pallas.choose_mgpu_config(4096, 4096, 1024, recipe.weight_format, 4).wgs == 2
            assert pallas.uses_dense(4096, acts, p, 4) != ws32 and pallas.uses_mgpu(p, 4096, acts, 4) == ws32
            assert not ws32  # 2 x 64 x 256 float32 output tiles: 128 KiB


@requires_gpu
@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 1000, 512), (2, 4096, 1024)])
def test_dense_path_matches_xla_on_gpu(recipe, rows, n, k):
    """At the default thresholds (just above the larger one; activations with ``rows`` leading
    axes), with prepared weights (a loaded model's), and the W4A8 fallback."""
    m = max(pallas.DENSE_MIN_M.values()) + 6
    lead = (m,) if rows == 1 else (2, m // 2)
    p = jaxfp4.prepare_weights(_params(recipe, n, k, fused=recipe.weight_format is FP4Format.NVFP4))
    x = jax.random.normal(jax.random.key(n), (*lead, k), jnp.float32).astype(jnp.bfloat16)
    acts = "fp8" if isinstance(recipe, MXFP4W4A8) else "bf16"
    _check_against_reference(x, p, _run(x, p, pallas.DENSE_MIN_M[acts], interpret=False))
    if isinstance(recipe, MXFP4W4A8):
        bad = _spread_out(p)
        _check_against_reference(x, bad, _run(x, bad, pallas.DENSE_MIN_M["fp8"], interpret=False))
