"""Equivalence with compressed-tensors' own quantize / compress / decompress functions.

Everything is compared with ``array_equal`` on bit patterns: packed codes, block scales, global
scales and the dequantized bf16 weights. The producer path mirrors llm-compressor's
``memoryless_minmax`` observer: min/max in the weight dtype, ``generate_gparam`` over the fused
group, ``calculate_qparams`` per group, then the compressor's ``compress``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

import jaxfp4
from jaxfp4.formats import (
    FP4Format,
    GlobalScale,
    QuantizedTensor,
    quantize_mxfp4_llmcompressor,
    quantize_nvfp4_llmcompressor,
)
from tests.torch_bridge import bits, to_np


def _weight(seed: int, n: int, k: int, *, zero_block: bool = True, spread: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if spread:  # rows and blocks across several binades, to reach small and subnormal scales
        w = w * torch.exp2(torch.randint(-12, 4, (n, 1), generator=g).float())
        w = w * torch.exp2(torch.randint(-6, 1, (1, k // 16), generator=g).float()).repeat_interleave(16, 1)
    if zero_block:
        w[0, :32] = 0.0
    return w.to(torch.bfloat16)


def _ct_nvfp4(parts: list[torch.Tensor], scheme_name: str = "NVFP4A16"):
    scheme = preset_name_to_scheme(scheme_name, ["Linear"])
    args = scheme.weights
    lo = torch.stack([p.min() for p in parts]).min()
    hi = torch.stack([p.max() for p in parts]).max()
    gs = generate_gparam(lo, hi)
    out = []
    for p in parts:
        n, k = p.shape
        pg = p.reshape(n, k // 16, 16)
        scale, _ = calculate_qparams(pg.amin(-1), pg.amax(-1), args, global_scale=gs)
        sd = NVFP4PackedCompressor.compress({"weight": p, "weight_scale": scale, "weight_global_scale": gs}, scheme)
        deq = NVFP4PackedCompressor.decompress(dict(sd), scheme)["weight"]
        out.append((sd, deq))
    return out


@pytest.mark.parametrize(("seed", "shape"), [(0, (64, 256)), (1, (48, 512)), (2, (130, 96))])
def test_nvfp4_encoder_and_dequant_match_compressed_tensors(seed, shape):
    w = _weight(seed, *shape)
    ((sd, deq),) = _ct_nvfp4([w])
    q = quantize_nvfp4_llmcompressor(jnp.asarray(to_np(w)))
    assert np.array_equal(np.asarray(q.codes), sd["weight_packed"].numpy())
    assert np.array_equal(bits(q.scales), bits(to_np(sd["weight_scale"])))
    assert np.array_equal(bits(q.global_scale), bits(sd["weight_global_scale"].numpy()))
    assert q.global_kind is GlobalScale.DIVISOR
    assert np.array_equal(bits(jaxfp4.dequantize(q, jnp.bfloat16)), bits(to_np(deq)))


def test_nvfp4_fused_group_shares_global_scale_like_llmcompressor():
    parts = [_weight(10 + i, n, 128) * (1 + 3 * i) for i, n in enumerate((64, 32, 32))]
    parts = [p.to(torch.bfloat16) for p in parts]
    ref = _ct_nvfp4(parts)
    q = quantize_nvfp4_llmcompressor([jnp.asarray(to_np(p)) for p in parts])
    assert q.partitions == (64, 32, 32)
    assert np.array_equal(np.asarray(q.codes), torch.cat([sd["weight_packed"] for sd, _ in ref]).numpy())
    gs = np.concatenate([sd["weight_global_scale"].numpy() for sd, _ in ref])
    assert np.array_equal(bits(q.global_scale), bits(gs)) and len(set(gs.tolist())) == 1
    assert np.array_equal(bits(jaxfp4.dequantize(q)), bits(to_np(torch.cat([d for _, d in ref]))))


def test_nvfp4_decompress_of_arbitrary_bytes_matches_compressed_tensors():
    """Decode every E2M1 code against every finite E4M3 scale byte, with per-partition divisors
    drawn over a wide range: our dequant == ``NVFP4PackedCompressor.decompress``, bit for bit."""
    rng = np.random.default_rng(3)
    scale_bytes = np.array([b for b in range(256) if b not in (0x7F, 0xFF)], np.uint8)
    n, k = len(scale_bytes), 16 * 16
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, k // 16))
    rng.permuted(codes, axis=1, out=codes)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(scale_bytes[:, None], k // 16, axis=1)
    scales = np.take_along_axis(scales, rng.permuted(np.tile(np.arange(k // 16), (n, 1)), axis=1), 1)
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    for g in [
        np.float32(26496.0),
        np.float32(1.0),
        np.float32(3.1e-3),
        rng.uniform(10, 1e5, 1).astype(np.float32)[0],
    ]:
        sd = {
            "weight_packed": torch.from_numpy(packed),
            "weight_scale": torch.from_numpy(scales.copy()).view(torch.float8_e4m3fn),
            "weight_global_scale": torch.tensor([g], dtype=torch.float32),
        }
        ref = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
        q = QuantizedTensor(
            codes=jnp.asarray(packed),
            scales=jnp.asarray(scales.view(jnp.float8_e4m3fn)),
            global_scale=jnp.asarray([g], jnp.float32),
            format=FP4Format.NVFP4,
            shape=(n, k),
            partitions=(n,),
            global_kind=GlobalScale.DIVISOR,
        ).validate()
        assert np.array_equal(bits(jaxfp4.dequantize(q)), bits(to_np(ref)))


@pytest.mark.parametrize(("seed", "shape"), [(0, (64, 256)), (4, (33, 96))])
def test_mxfp4_encoder_and_dequant_match_compressed_tensors(seed, shape):
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    w = _weight(seed, *shape)
    n, k = shape
    wg = w.reshape(n, k // 32, 32)
    scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights)
    sd = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    deq = MXFP4PackedCompressor.decompress(dict(sd), scheme)["weight"]
    q = quantize_mxfp4_llmcompressor(jnp.asarray(to_np(w)))
    assert np.array_equal(np.asarray(q.codes), sd["weight_packed"].numpy())
    assert np.array_equal(np.asarray(q.scales), sd["weight_scale"].numpy())
    assert np.array_equal(bits(jaxfp4.dequantize(q)), bits(to_np(deq.to(torch.bfloat16))))


def test_mxfp4_decompress_all_exponents_matches_compressed_tensors():
    """All E2M1 codes against E8M0 exponents 2..254: bit-exact with compressed-tensors.

    Exponents 0 and 1 produce float32 subnormals that XLA:CPU flushes to zero (stated in
    ``dequantize``'s docstring and pinned below); 255 is NaN by the OCP spec, where
    compressed-tensors returns inf — the loader refuses it.
    """
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    exps = np.arange(2, 255, dtype=np.uint8)
    n, k = len(exps), 64
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, k // 16))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(exps[:, None], k // 32, axis=1)
    sd = {"weight_packed": torch.from_numpy(packed), "weight_scale": torch.from_numpy(scales)}
    ref = MXFP4PackedCompressor.decompress(sd, scheme)["weight"].to(torch.bfloat16)
    q = QuantizedTensor(
        codes=jnp.asarray(packed),
        scales=jnp.asarray(scales),
        global_scale=None,
        format=FP4Format.MXFP4,
        shape=(n, k),
        partitions=(n,),
        global_kind=GlobalScale.NONE,
    ).validate()
    assert np.array_equal(bits(jaxfp4.dequantize(q)), bits(to_np(ref)))
    low = QuantizedTensor(
        codes=jnp.asarray(packed[:2]),
        scales=jnp.asarray(np.array([[0, 0], [1, 1]], np.uint8)),
        global_scale=None,
        format=FP4Format.MXFP4,
        shape=(2, k),
        partitions=(2,),
        global_kind=GlobalScale.NONE,
    )
    got = np.asarray(jaxfp4.dequantize(low, jnp.float32))
    vals = np.tile(np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2, np.float32) * np.repeat([1, -1], 8), k // 16)
    want = np.stack([np.ldexp(vals, -127), np.ldexp(vals, -126)])
    normal = np.abs(want) >= np.float32(2.0**-126)
    assert np.array_equal(got[normal], want[normal]) and np.all(got[~normal] == 0)
