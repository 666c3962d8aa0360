"""Real checkpoints made by the real producer tools (tests/fixtures/make_fixtures.py): every
loaded module's ``dequantize`` is ``array_equal`` (bit patterns) with the producer's own
decompression, and the scheme, scales and placement come out as the producer meant them."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import jaxfp4
from jaxfp4.checkpoint import SafetensorsFile
from tests.torch_bridge import bits, to_np

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
LLAMA_LINEARS = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
EXPECTED = {
    "ct-nvfp4": ("compressed-tensors", "nvfp4_w4a4"),
    "ct-nvfp4a16": ("compressed-tensors", "nvfp4_w4a16"),
    "ct-mxfp4a16": ("compressed-tensors", "mxfp4_w4a16"),
    "modelopt-nvfp4": ("modelopt", "nvfp4_w4a4"),
    "modelopt-w4a16-nvfp4": ("modelopt", "nvfp4_w4a16"),
    "quark-nvfp4": ("quark", "nvfp4_w4a4"),
    "quark-mxfp4-fp8": ("quark", "mxfp4_w4a8"),
}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scheme_detected_and_lm_head_dense(name):
    ck = jaxfp4.load_checkpoint(fixture(name))
    producer, recipe = EXPECTED[name]
    assert ck.producer == producer
    assert sorted(ck.quantized) == sorted(LLAMA_LINEARS)
    assert {p.recipe.name for p in ck.quantized.values()} == {recipe}
    assert "lm_head.weight" in ck.dense and "model.embed_tokens.weight" in ck.dense
    assert not ck.report.fatal and not ck.report.unexpected


@pytest.mark.parametrize("name", ["ct-nvfp4", "ct-nvfp4a16", "ct-mxfp4a16"])
def test_compressed_tensors_modules_match_ct_decompress(name):
    path = fixture(name)
    ck = jaxfp4.load_checkpoint(path)
    with open(os.path.join(path, "config.json")) as f:
        qc = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    scheme = qc.config_groups["group_0"]
    sd = _all_tensors(path)
    compressor = MXFP4PackedCompressor if "mxfp4" in name else NVFP4PackedCompressor
    for module in LLAMA_LINEARS:
        part = {k[len(module) + 1 :]: v for k, v in sd.items() if k.startswith(module + ".")}
        ref = compressor.decompress(part, scheme)["weight"].to(torch.bfloat16)
        got = np.asarray(jaxfp4.dequantize(ck.quantized[module], dtype=jax.numpy.bfloat16))
        np.testing.assert_array_equal(bits(got), bits(to_np(ref)), err_msg=module)


def test_compressed_tensors_w4a4_activation_divisor_is_stored_value():
    ck = jaxfp4.load_checkpoint(fixture("ct-nvfp4"))
    sd = _all_tensors(fixture("ct-nvfp4"))
    for module in LLAMA_LINEARS:
        stored = sd[module + ".input_global_scale"].numpy().reshape(())
        assert np.asarray(ck.quantized[module].input_scale) == stored  # a divisor: kept as is


@pytest.mark.parametrize("name", ["modelopt-nvfp4", "modelopt-w4a16-nvfp4", "quark-nvfp4", "quark-mxfp4-fp8", "quark-mxfp4"])
def test_modelopt_and_quark_modules_match_producer_dequant(name):
    """references/<name>.safetensors holds the producer's own dequantization, saved by the
    generator (ModelOpt ``NVFP4QTensor.dequantize``; Quark's weight fake-quantizer)."""
    ck = jaxfp4.load_checkpoint(fixture(name), weight_only=(name == "quark-mxfp4"))
    ref = np_load_file(os.path.join(FIXTURES, "references", name + ".safetensors"))
    assert sorted(ref) == sorted(LLAMA_LINEARS)
    for module, want in ref.items():
        got = np.asarray(jaxfp4.dequantize(ck.quantized[module], dtype=jax.numpy.bfloat16))
        want = want.view(ml_dtypes.bfloat16) if want.dtype == np.uint16 else want
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=module)


@pytest.mark.parametrize(
    "name,key,suffix",
    [("modelopt-nvfp4", "input_scale", "input_scale"), ("quark-nvfp4", "input_scale", "input_scale_2")],
)
def test_multiplier_activation_scales_become_divisors(name, key, suffix):
    """ModelOpt ``input_scale`` and Quark ``input_scale_2`` are multipliers; W4A4 params hold the
    divisor ``f32(1 / m)`` (one IEEE division, as vLLM computes ``input_scale_inv``)."""
    ck = jaxfp4.load_checkpoint(fixture(name))
    sd = _all_tensors(fixture(name))
    for module in LLAMA_LINEARS:
        m = sd[f"{module}.{suffix}"].numpy().astype(np.float32).reshape(())
        assert np.asarray(ck.quantized[module].input_scale) == np.float32(1.0) / m


def test_quark_w4a8_input_scale_kept_exactly_from_bf16():
    ck = jaxfp4.load_checkpoint(fixture("quark-mxfp4-fp8"))
    sd = _all_tensors(fixture("quark-mxfp4-fp8"))
    for module in LLAMA_LINEARS:
        stored = sd[module + ".input_scale"]
        assert stored.dtype == torch.bfloat16  # Quark writes the model dtype
        assert np.asarray(ck.quantized[module].input_scale) == stored.float().numpy()


def test_quark_mxfp4_w4a4_needs_weight_only():
    with pytest.raises(jaxfp4.CheckpointError, match="weight_only=True") as e:
        jaxfp4.load_checkpoint(fixture("quark-mxfp4"))
    assert "config.json" in str(e.value)
    ck = jaxfp4.load_checkpoint(fixture("quark-mxfp4"), weight_only=True)
    assert {p.recipe.name for p in ck.quantized.values()} == {"mxfp4_w4a16"}


def test_gpt_oss_experts_match_transformers():
    path = fixture("gptoss-mxfp4")
    ck = jaxfp4.load_checkpoint(path)
    sd = _all_tensors(path)
    assert ck.producer == "gpt-oss"
    assert "model.layers.0.self_attn.q_proj.weight" in ck.dense  # attention stays bf16
    for layer in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            p = f"model.layers.{layer}.mlp.experts.{proj}"
            ref = convert_moe_packed_tensors(sd[p + "_blocks"], sd[p + "_scales"], dtype=torch.bfloat16)  # [E, K, N]
            for e in range(ref.shape[0]):
                params = ck.quantized[f"model.layers.{layer}.mlp.experts.{e}.{proj}"]
                got = np.asarray(jaxfp4.dequantize(params, dtype=jax.numpy.bfloat16))
                np.testing.assert_array_equal(bits(got), bits(to_np(ref[e].T.contiguous())))
                np.testing.assert_array_equal(bits(np.asarray(params.bias)), bits(to_np(sd[p + "_bias"][e])))


def test_sharded_checkpoint_reads_every_shard():
    path = fixture("ct-nvfp4")
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    keys = set()
    for s in shards:
        keys |= set(SafetensorsFile(os.path.join(path, s)).tensors)
    ck = jaxfp4.load_checkpoint(path, progress=True)
    suffixes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    covered = {f"{m}.{s}" for m in ck.quantized for s in suffixes} | set(ck.dense)
    assert covered == keys


def test_placement_callable_sees_every_tensor_and_device():
    cpu = jax.devices("cpu")[0]
    seen = []

    def place(name, shape):
        seen.append(name)
        return cpu

    ck = jaxfp4.load_checkpoint(fixture("modelopt-nvfp4"), place=place)
    m = "model.layers.0.mlp.down_proj"
    for role in ("weight.codes", "weight.scales", "weight.global_scale", "input_scale"):
        assert f"{m}.{role}" in seen
    assert "lm_head.weight" in seen
    assert ck.quantized[m].weight.codes.devices() == {cpu}


def test_loaded_params_run_through_fp4_linear():
    ck = jaxfp4.load_checkpoint(fixture("ct-mxfp4a16"))
    p = ck.quantized["model.layers.0.mlp.down_proj"]
    x = jax.random.normal(jax.random.key(0), (3, p.in_features), jax.numpy.bfloat16)
    y = jaxfp4.fp4_linear(x, p, backend="xla").astype(jax.numpy.float32)
    w = jaxfp4.dequantize(p, dtype=jax.numpy.bfloat16).astype(jax.numpy.float32)
    ref = x.astype(jax.numpy.float32) @ w.T
    # Same exact products; only the fp32 summation order may differ (K=128 terms, far below
    # bf16's resolution) before the bf16 rounding of y: within one bf16 ulp (2^-8 relative).
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2**-8, atol=1e-6)


FUSED = [
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("self_attn.o_proj",),
    ("mlp.down_proj",),
]


@pytest.mark.parametrize(
    "name,encode",
    [
        ("modelopt-nvfp4", jaxfp4.formats.quantize_nvfp4_modelopt),
        ("ct-nvfp4a16", jaxfp4.formats.quantize_nvfp4_llmcompressor),
        (
            "ct-mxfp4a16",
            lambda w: jaxfp4.formats.quantize_mxfp4_llmcompressor(jax.numpy.concatenate(w) if isinstance(w, list) else w),
        ),
    ],
)
def test_encoders_reproduce_producer_bytes(name, encode):
    """From the original bf16 weights (references/base-linears.safetensors), our encoders write the
    bytes the real tool wrote: codes, block scales and (shared per fused group) global scales."""
    base = SafetensorsFile(os.path.join(FIXTURES, "references", "base-linears.safetensors"))
    ck = jaxfp4.load_checkpoint(fixture(name))
    for layer in range(2):
        for group in FUSED:
            mods = [f"model.layers.{layer}.{g}" for g in group]
            ws = [jax.numpy.asarray(np.asarray(base.read(m))) for m in mods]
            q = encode(ws if len(ws) > 1 else ws[0])
            loaded = [ck.quantized[m].weight for m in mods]
            np.testing.assert_array_equal(np.asarray(q.codes), np.concatenate([np.asarray(w.codes) for w in loaded]))
            np.testing.assert_array_equal(
                bits(np.asarray(q.scales)), np.concatenate([bits(np.asarray(w.scales)) for w in loaded])
            )
            if q.global_scale is not None:
                want = np.concatenate([np.asarray(w.global_scale) for w in loaded])
                np.testing.assert_array_equal(np.asarray(q.global_scale), want)
