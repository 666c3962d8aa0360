"""The MXFP4 x FP8 kernel (jaxfp4.kernels.w4a8_triton): each exactness claim checked exhaustively,
the kernel against the exact product and against the "xla" reference (interpret mode on CPU, the
real kernel on a GPU), and CUDA lowering from a CPU-only install.

Tolerances. The weights ``e2m1 * 2**-6`` and activations are exact E4M3 values, so every product
is exact; against the float64 product the kernel's error is float32 summation (``K * 2**-24 * A``,
``A = |x| @ |w|.T``, a loose bound) plus, on the GPU, the FP8 tensor core's own accumulation
inside one K=32 MMA, which keeps about 14 significant bits (DeepSeek-V3 report, section 3.3.2;
../shared/research/performance.md): ``2**-13 * A``. Against the "xla" reference the bound of
``tests/kernels/test_w4a16.py`` applies: its ``2**-8 * A`` term (there for weight rounding, which
is exact for MXFP4) covers the reference's rounding of ``fp8 * input_scale`` to bf16 (``2**-9``
relative per activation) and the ``2**-13`` above.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, codecs, quantize_fp8_static, quantize_mxfp4_llmcompressor
from jaxfp4.kernels.w4a8_triton import e2m1_to_e4m3_bits, expand_block_e4m3, mxfp4_fp8_matmul_partials
from jaxfp4.kernels.w4a16_triton import BlockConfig, fp4_matmul_partials
from jaxfp4.ops import pallas as pallas_backend
from jaxfp4.ops import pallas_interpret
from tests.conftest import requires_gpu
from tests.kernels.test_w4a16 import _check_against_reference, _params

E4M3 = ml_dtypes.float8_e4m3fn


def test_nibble_to_e4m3_bits_for_all_256_bytes():
    """Both nibbles of every byte become the E4M3 pattern of ``e2m1 * 2**-6`` (code 8 -> -0.0)."""
    b = np.arange(256, dtype=np.uint8)
    for hi in (False, True):
        got = np.asarray(e2m1_to_e4m3_bits(jnp.asarray(b), hi))
        nib = (b >> 4) if hi else (b & 0xF)
        want = (codecs.E2M1_VALUES[nib].astype(np.float64) * 2.0**-6).astype(E4M3).view(np.uint8)
        assert np.array_equal(got, want)
    assert int(e2m1_to_e4m3_bits(jnp.uint8(0x08), False)) == 0x80  # -0.0 keeps its sign


def test_block_expansion_is_natural_k_order():
    w = jax.random.randint(jax.random.key(0), (8, 16), 0, 256, jnp.int32).astype(jnp.uint8)
    got = np.asarray(expand_block_e4m3(w).astype(jnp.float32), np.float64)
    want = np.asarray(codecs.decode_e2m1(codecs.unpack_nibbles(w)), np.float64) * 2.0**-6
    assert np.array_equal(got, want)


def test_e2m1_times_power_of_two_is_exact_in_e4m3_exactly_for_j_in_minus8_to_6():
    """The window that folding a block exponent into an FP8 weight would have (why the kernel
    rescales per block in float32 instead): all 16 codes, every j."""
    v = codecs.E2M1_VALUES.astype(np.float64)
    exact = {j: bool(np.array_equal((v * 2.0**j).astype(E4M3).astype(np.float64), v * 2.0**j)) for j in range(-12, 10)}
    assert [j for j, ok in exact.items() if ok] == list(range(-8, 7))


def test_every_e4m3_product_is_exact_in_float32():
    """All 256 x 256 pairs (NaN excluded): the FP8 MMA's products lose nothing."""
    a = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    a = a[~np.isnan(a)]
    p64 = a[:, None] * a[None, :]
    p32 = a.astype(np.float32)[:, None] * a.astype(np.float32)[None, :]
    assert np.array_equal(p32.astype(np.float64), p64)


VARIANTS = [
    BlockConfig(bm=16, bn=64, bk=64, split_k=2, dequant="fp8"),
    BlockConfig(bm=32, bn=32, bk=128, split_k=1, dequant="fp8"),
    BlockConfig(bm=16, bn=64, bk=32, split_k=4, swap=True, dequant="fp8"),
]
GPU_VARIANTS = [
    BlockConfig(bm=64, bn=64, bk=128, split_k=2, num_warps=4, dequant="fp8"),
    BlockConfig(bm=128, bn=128, bk=128, split_k=1, num_warps=8, dequant="fp8"),
    BlockConfig(bm=128, bn=64, bk=64, split_k=2, num_warps=4, swap=True, dequant="fp8"),
]


def _fp8_partials_check(cfg, m, interpret, tol_mma):
    k, n = 1024, 128
    w = (jax.random.normal(jax.random.key(3), (n, k), jnp.float32) * 0.05).astype(jnp.bfloat16)
    q = quantize_mxfp4_llmcompressor(w)
    # Scales spread over 2**-20..2**5 so that no folding window would hold a row.
    spread = jax.random.randint(jax.random.key(5), q.scales.shape, 107, 133, jnp.int32).astype(jnp.uint8)
    x8 = quantize_fp8_static(jax.random.normal(jax.random.key(4), (m, k), jnp.float32).astype(jnp.bfloat16), 0.01)
    parts = mxfp4_fp8_matmul_partials(x8, q.codes, spread, cfg=cfg, interpret=interpret)
    wq = np.asarray(codecs.decode_e2m1(codecs.unpack_nibbles(q.codes)), np.float64)
    ws = wq * np.repeat(np.asarray(codecs.decode_e8m0(spread), np.float64), 32, axis=1)
    xd = np.asarray(x8.astype(jnp.float32), np.float64)
    exact, a = xd @ ws.T, np.abs(xd) @ np.abs(ws).T
    got = np.asarray(parts, np.float64).sum(0) * 2.0**6
    assert parts.shape == (cfg.split_k, m, n)
    bound = (k * 2.0**-24 + tol_mma) * a + 1e-30
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) / bound))


@pytest.mark.parametrize("cfg", VARIANTS, ids=str)
def test_fp8_kernel_partials_equal_exact_product_in_interpret_mode(cfg):
    _fp8_partials_check(cfg, 2 * cfg.bm, interpret=True, tol_mma=0.0)


@requires_gpu
@pytest.mark.parametrize("cfg", GPU_VARIANTS, ids=str)
def test_fp8_kernel_on_gpu(cfg):
    _fp8_partials_check(cfg, 2 * cfg.bm, interpret=False, tol_mma=2.0**-13)


@pytest.mark.parametrize(("cfg", "lead", "n", "k"), list(itertools.product(VARIANTS, [(3,), (2, 33)], [40, 130], [96, 256])))
def test_w4a8_fp8_kernel_matches_xla_in_interpret_mode(cfg, lead, n, k):
    p = _params(MXFP4W4A8(), n, k)
    x = jax.random.normal(jax.random.key(7), (*lead, k), jnp.float32).astype(jnp.bfloat16)
    m = int(np.prod(lead))
    with pallas_backend.tuned_override([pallas_backend.tuned_entry(m, n, k, p.weight.format, cfg, acts="fp8")]):
        assert pallas_backend.choose_config(m, n, k, p.weight.format, "fp8") == cfg
        with pallas_interpret():
            y = jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"))(x, p)
    _check_against_reference(x, p, y)


def test_w4a8_default_is_the_w4a16_kernel_and_a_tuned_fp8_entry_is_honoured():
    """Untuned shapes run the W4A16 kernel on the FP8 values (faster on the H100 at every M); a
    tuned-config record with ``dequant="fp8"`` selects the FP8 kernel."""
    fmt = MXFP4W4A8().weight_format
    choose = pallas_backend.choose_config
    with pallas_backend.tuned_override([]):
        for m in (1, 16, 128, 4096):
            assert choose(m, 4096, 4096, fmt, "fp8") == choose(m, 4096, 4096, fmt)
    with pallas_backend.tuned_override([pallas_backend.tuned_entry(4096, 4096, 4096, fmt, VARIANTS[1], acts="fp8")]):
        assert choose(3000, 4096, 4096, fmt, "fp8") == VARIANTS[1]
        assert choose(3000, 4096, 4096, fmt, "bf16").dequant != "fp8"


def test_fp8_kernel_refuses_wrong_inputs():
    codes, scales = jnp.zeros((64, 64), jnp.uint8), jnp.zeros((64, 4), jnp.uint8)
    cfg = BlockConfig(16, 64, 64, 1, dequant="fp8")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        mxfp4_fp8_matmul_partials(jnp.zeros((16, 128), jnp.bfloat16), codes, scales, cfg=cfg)
    odd = BlockConfig(16, 64, 48, 1, dequant="fp8")
    with pytest.raises(ValueError, match="multiple of the MXFP4 block"):
        mxfp4_fp8_matmul_partials(jnp.zeros((16, 128), jnp.float8_e4m3fn), codes, scales, cfg=odd)
    with pytest.raises(ValueError, match="unknown dequant"):
        fp4_matmul_partials(jnp.zeros((16, 128), jnp.bfloat16), codes, scales, cfg=cfg, mx=True)


@pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11),
    reason="jax >= 0.11 refuses to lower for CUDA without a GPU; CI runs jax 0.10.x",
)
def test_fp8_kernel_lowers_for_cuda_on_cpu_install():
    k = 512
    codes, scales = jnp.zeros((128, k // 2), jnp.uint8), jnp.zeros((128, k // 32), jnp.uint8)
    for cfg in (*VARIANTS, *GPU_VARIANTS):
        x = jnp.zeros((cfg.bm, k), jnp.float8_e4m3fn)
        f = jax.jit(lambda a, b, c, cfg=cfg: mxfp4_fp8_matmul_partials(a, b, c, cfg=cfg))
        text = f.trace(x, codes, scales).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text
