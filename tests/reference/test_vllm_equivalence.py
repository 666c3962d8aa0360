"""jaxfp4 formats vs the PyTorch transcription of vLLM's emulation path (``vllm_ref``).

Every tensor is compared bit for bit (``array_equal`` on bit patterns or values where the
reference's sign of zero is arbitrary, as in vLLM's ``cast_to_fp4`` which returns ``sign(x)*|q|``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

from jaxfp4.formats import (
    ActivationQuant,
    FP4Format,
    GlobalScale,
    QuantizedTensor,
    codecs,
    dequantize,
    fake_quantize_fp8_static,
    fake_quantize_nvfp4_activations,
    quantize_fp8_static,
    quantize_nvfp4_activations,
)
from tests.reference import vllm_ref
from tests.torch_bridge import bits, to_np


def _acts(seed: int, m: int, k: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3
    x[0, :16] = 0.0  # an all-zero block
    x[1, 16:32] = 1e-30  # a block whose scale underflows to zero
    x[2, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)  # ties after scaling by 1
    return x.to(dtype)


@pytest.mark.parametrize("g", [644.0, 2544.0, 1234.5678, 5.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvfp4_activation_quant_matches_vllm_ref(g, dtype):
    x = _acts(int(g), 256, 256, dtype)
    gs = torch.tensor([g], dtype=torch.float32)
    ref_q, ref_s = vllm_ref.ref_nvfp4_quant(x, gs, 16)
    ref_dq = vllm_ref.ref_nvfp4_quant_dequant(x, gs, 16)
    xj = jnp.asarray(to_np(x))
    packed, scales = quantize_nvfp4_activations(xj, jnp.float32(g), mode=ActivationQuant.VLLM)
    vals = np.asarray(codecs.decode_e2m1(codecs.unpack_nibbles(packed)))
    assert np.array_equal(vals, ref_q.numpy())  # values (vLLM's zeros carry sign(x))
    assert np.array_equal(np.asarray(scales).astype(np.float32), ref_s.numpy())
    dq = fake_quantize_nvfp4_activations(xj, jnp.float32(g), mode=ActivationQuant.VLLM)
    assert dq.dtype == xj.dtype
    assert np.array_equal(np.asarray(dq).astype(np.float32), to_np(ref_dq).astype(np.float32))


@pytest.mark.parametrize("g", [644.0, 400.0, 5.0])
def test_nvfp4_activation_quant_vllm_mode_under_jit(g):
    x = _acts(int(g), 256, 256, torch.bfloat16)
    ref_dq = vllm_ref.ref_nvfp4_quant_dequant(x, torch.tensor([g], dtype=torch.float32), 16)
    f = jax.jit(lambda a: fake_quantize_nvfp4_activations(a, jnp.float32(g), mode=ActivationQuant.VLLM))
    got = f(jnp.asarray(to_np(x)))
    assert np.array_equal(np.asarray(got).astype(np.float32), to_np(ref_dq).astype(np.float32))


@pytest.mark.parametrize("g", [644.0, 2544.0, 1234.5678])
def test_nvfp4_activation_compressed_tensors_mode_matches_fake_quantize(g):
    x = _acts(7, 512, 256)
    args = QuantizationArgs(
        num_bits=4,
        type="float",
        strategy="tensor_group",
        symmetric=True,
        dynamic="local",
        group_size=16,
        scale_dtype=torch.float8_e4m3fn,
        zp_dtype=torch.float8_e4m3fn,
    )
    gs = torch.tensor([g], dtype=torch.float32)
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gs)
    ref = fake_quantize(x=x, scale=scale, zero_point=zp, args=args, global_scale=gs)
    xj = jnp.asarray(to_np(x))
    ours = fake_quantize_nvfp4_activations(xj, jnp.float32(g), mode=ActivationQuant.COMPRESSED_TENSORS)
    assert np.array_equal(np.asarray(ours).astype(np.float32), to_np(ref).astype(np.float32))
    _, sc = quantize_nvfp4_activations(xj, jnp.float32(g), mode=ActivationQuant.COMPRESSED_TENSORS)
    assert np.array_equal(bits(sc), bits(to_np(scale.to(torch.float8_e4m3fn))))


def test_the_two_activation_modes_differ_as_documented():
    x = jnp.asarray(to_np(_acts(3, 512, 256)))
    a = fake_quantize_nvfp4_activations(x, jnp.float32(644.0), mode=ActivationQuant.VLLM)
    b = fake_quantize_nvfp4_activations(x, jnp.float32(644.0), mode=ActivationQuant.COMPRESSED_TENSORS)
    frac = float(jnp.mean((a != b).astype(jnp.float32)))
    assert 0.001 < frac < 0.03  # ~1% of elements (research: amax/6 in bf16 vs f32 * f32(1/6))


def test_nvfp4_activation_special_values():
    x = np.zeros((1, 48), np.float32)
    x[0, :16] = np.linspace(-1, 1, 16)
    x[0, 3] = np.nan
    x[0, 16:32] = np.linspace(-1, 1, 16)
    x[0, 20] = np.inf
    x[0, 32:48] = np.linspace(-1, 1, 16)
    dq = np.asarray(fake_quantize_nvfp4_activations(jnp.asarray(x), jnp.float32(100.0)))
    ref = vllm_ref.ref_nvfp4_quant_dequant(torch.from_numpy(x), torch.tensor([100.0]), 16).numpy()
    assert np.isnan(dq[0, :16]).all() and np.isnan(ref[0, :16]).all()  # NaN poisons its block
    assert dq[0, 20] == np.float32(6) * (np.float32(448) / np.float32(100)) == ref[0, 20]  # +inf -> 6 * f32(448/g)
    assert np.array_equal(dq[0, 16:], ref[0, 16:])


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_static_quant_matches_vllm_and_quark(dtype, scale_dtype):
    x = _acts(11, 128, 256, dtype) * 40
    s = torch.tensor(0.0371, dtype=scale_dtype)
    ref_q, ref_dq = vllm_ref.quant_fp8_static(x, s)
    xj = jnp.asarray(to_np(x))
    sj = jnp.asarray(to_np(s.reshape(1))).reshape(())
    assert np.array_equal(bits(quantize_fp8_static(xj, sj)), bits(to_np(ref_q)))
    assert np.array_equal(bits(fake_quantize_fp8_static(xj, sj)), bits(to_np(ref_dq)))


def test_mxfp4_dequant_matches_vllm_dequant_mxfp4():
    rng = np.random.default_rng(5)
    w = rng.integers(0, 256, (96, 64), dtype=np.uint8)
    e = rng.integers(100, 140, (96, 4), dtype=np.uint8)
    q = QuantizedTensor(jnp.asarray(w), jnp.asarray(e), None, FP4Format.MXFP4, (96, 128), (96,), GlobalScale.NONE)
    for tdt, jdt in [
        (torch.bfloat16, jnp.bfloat16),
        (torch.float32, jnp.float32),
        (torch.float16, jnp.float16),
    ]:
        ref = vllm_ref.dequant_mxfp4(torch.from_numpy(w), torch.from_numpy(e), tdt)
        assert np.array_equal(np.asarray(dequantize(q, jdt)).astype(np.float32), to_np(ref).astype(np.float32))


def test_nvfp4_multiplier_dequant_matches_vllm_dequantize_to_dtype():
    rng = np.random.default_rng(6)
    w = rng.integers(0, 256, (64, 128), dtype=np.uint8)
    s = rng.integers(0, 0x7F, (64, 16), dtype=np.uint8)
    m = np.float32(1.0) / np.float32(26496.0)
    q = QuantizedTensor(
        jnp.asarray(w),
        jnp.asarray(s.view(ml_dtypes.float8_e4m3fn)),
        jnp.asarray([m]),
        FP4Format.NVFP4,
        (64, 256),
        (64,),
        GlobalScale.MULTIPLIER,
    )
    ref = vllm_ref.dequantize_to_dtype(torch.from_numpy(w), torch.from_numpy(s), torch.tensor(m), torch.bfloat16)
    assert np.array_equal(np.asarray(dequantize(q)).astype(np.float32), to_np(ref).astype(np.float32))


def test_million_random_divisor_dequants_are_ieee_exact_in_float32():
    """10^6 random (code, scale, divisor) triples: ``f32(q * f32(s / g))`` exactly, in float32
    output (where divide-vs-reciprocal differs in ~21% of cases), under jit."""
    rng = np.random.default_rng(8)
    n, k = 1000, 1024
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    sbytes = rng.integers(0, 0x7F, (n, k // 16), dtype=np.uint8)
    parts = (400, 350, 250)
    g = rng.uniform(1.0, 3e4, len(parts)).astype(np.float32)
    q = QuantizedTensor(
        jnp.asarray(packed),
        jnp.asarray(sbytes.view(ml_dtypes.float8_e4m3fn)),
        jnp.asarray(g),
        FP4Format.NVFP4,
        (n, k),
        parts,
        GlobalScale.DIVISOR,
    )
    got = np.asarray(jax.jit(lambda t: dequantize(t, jnp.float32))(q))
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, k)
    vals = codecs.E2M1_VALUES[codes]
    sv = sbytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    eff = sv / np.repeat(g, parts)[:, None]
    want = (vals.reshape(n, k // 16, 16) * eff[..., None]).reshape(n, k)
    assert np.array_equal(bits(got), bits(want))
