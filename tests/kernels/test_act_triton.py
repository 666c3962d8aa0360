"""The one-kernel activation quantizations (jaxfp4/kernels/act_triton.py).

Each must equal the "xla" path bit for bit: NVFP4 quantize-dequantize against
``fake_quantize_nvfp4_activations`` (vLLM mode), the static FP8 codes' values against
``decode_e4m3(quantize_fp8_static(x, s))`` in bf16; on CPU in Pallas interpret mode (CI) and on
the GPU, over odd shapes, every activation dtype, scales that push block scales or codes into
E4M3's subnormals and saturation, and special values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfp4.formats import codecs
from jaxfp4.formats.activations import fake_quantize_nvfp4_activations, quantize_fp8_static
from jaxfp4.kernels import act_triton as A
from tests.conftest import requires_gpu

CASES = [(1, 4096), (5, 160), (16, 1024), (37, 2048), (9, 14336 // 14)]


def _x(seed: int, m: int, k: int, dtype) -> jax.Array:
    """Activations over many magnitudes (a per-block factor of 2**-20..2**12), with zero blocks,
    +-inf, NaN and float subnormals planted."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * 2.0 ** rng.integers(-20, 13, (m, k // 16, 1)).repeat(16, -1).reshape(m, k)
    x = x.astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.permutation(flat.size)
    flat[idx[:16]] = 0.0
    if flat.size > 64:
        flat[idx[16]], flat[idx[17]], flat[idx[18]] = np.inf, -np.inf, np.nan
        flat[idx[19:23]] = np.float32(1e-40)  # float32 subnormals
    if m * k >= 64:
        x.reshape(-1, 16)[1] = 0.0  # a whole zero block
    return jnp.asarray(x).astype(dtype)


def _same(a: jax.Array, b: jax.Array) -> bool:
    """Bit-identical (NaNs included)."""
    u = {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    bits = [np.asarray(jax.lax.bitcast_convert_type(v, u)) for v in (a, b)]
    return bool(np.array_equal(*bits))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(("m", "k"), CASES)
@pytest.mark.parametrize("g", [1.0, 300.0, 2.0**20])  # 2**20: block scales saturate at 448
def test_kernel_equals_reference_in_interpret_mode(m, k, dtype, g):
    x = _x(m * k, m, k, dtype)
    got = A.fake_quantize_nvfp4_vllm(x, jnp.float32(g), interpret=True)
    want = jax.jit(lambda x, g: fake_quantize_nvfp4_activations(x, g))(x, jnp.float32(g))
    assert got.dtype == x.dtype and got.shape == x.shape
    assert _same(got, want)


def test_blocking_covers_any_k_multiple_of_16():
    got = [A.blocks(m, k) for m, k in ((1, 16), (5, 160), (1, 4096), (16, 4096), (128, 14336), (4096, 14336), (3, 48))]
    assert got == [(1, 16), (1, 32), (1, 128), (1, 128), (8, 256), (8, 1024), (1, 16)]
    with pytest.raises(ValueError, match="multiple of 16"):
        A.fake_quantize_nvfp4_vllm(jnp.zeros((2, 24), jnp.bfloat16), jnp.float32(1.0), interpret=True)


@pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11),
    reason="jax >= 0.11 refuses to lower for CUDA without a GPU; CI runs jax 0.10.x",
)
@pytest.mark.parametrize("fn", [A.fake_quantize_nvfp4_vllm, A.fp8_static_values])
def test_kernel_lowers_for_cuda_on_cpu_install(fn):
    """Every primitive of the shared arithmetic has a Pallas Triton lowering rule."""
    for m, k in [(1, 4096), (4096, 14336), (5, 160)]:
        f = jax.jit(lambda x, g: fn(x, g))
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.float32))
        assert "triton" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _fp8_values_reference(x: jax.Array, s: float) -> jax.Array:
    return jax.jit(lambda x, s: codecs.decode_e4m3(quantize_fp8_static(x, s)).astype(jnp.bfloat16))(x, jnp.float32(s))


# FP8 static scales: 1 (most of _x's range saturates at 448 or flushes to zero), 0.01, a scale
# whose quotients are inexact everywhere (1/3 has no short binary form), 2**-12 and 2**20 (codes
# at both ends of E4M3: saturation and subnormals).
FP8_SCALES = [1.0, 0.01, 1.0 / 3.0, 2.0**-12, 2.0**20]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(("m", "k"), CASES)
def test_fp8_values_equal_reference_in_interpret_mode(m, k, dtype):
    x = _x(m * k + 1, m, k, dtype)
    for s in FP8_SCALES:
        got = A.fp8_static_values(x, jnp.float32(s), interpret=True)
        assert got.dtype == jnp.bfloat16 and got.shape == x.shape
        assert _same(got, _fp8_values_reference(x, s)), s


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(("m", "k"), [*CASES, (4096, 14336)])
def test_fp8_values_equal_reference_on_gpu(m, k, dtype):
    x = _x(m + k + 1, m, k, dtype)
    for s in FP8_SCALES:
        assert _same(A.fp8_static_values(x, jnp.float32(s)), _fp8_values_reference(x, s)), (m, k, s)


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(("m", "k"), [*CASES, (4096, 14336)])
def test_kernel_equals_reference_on_gpu(m, k, dtype):
    x = _x(m + k, m, k, dtype)
    for g in (1.0, 300.0, 2.0**20):
        got = A.fake_quantize_nvfp4_vllm(x, jnp.float32(g))
        want = jax.jit(lambda x, g: fake_quantize_nvfp4_activations(x, g))(x, jnp.float32(g))
        assert _same(got, want), (m, k, g)
