"""Tensor-parallel FP4 layers on 8 simulated CPU devices (tests/conftest.py sets the device count).

Column-parallel outputs are computed by the same arithmetic as unsharded ones, so they must be
bit-identical. Row-parallel outputs sum float32 partials across devices: only the summation
order differs, bounded by ``2 * K * 2**-24 * sum|x*w|`` plus one bf16 output rounding
(``2**-8 |y|``); on these small shapes they also come out identical, which is checked too
where it holds for the xla backend on CPU.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxfp4
from jaxfp4.formats import quantize_mxfp4_llmcompressor, quantize_nvfp4_llmcompressor, slice_rows
from jaxfp4.models.llama import Llama, TPConfig, generate
from jaxfp4.nn import Fp4Linear
from jaxfp4.ops import pallas, pallas_interpret
from jaxfp4.sharding import (
    LLAMA_PLAN,
    Parallel,
    TensorParallel,
    checkpoint_placement,
    dense_specs,
    fuse_columns,
    per_row_global_scale,
    shard_major,
    shard_params,
    split_columns,
    tp_linear,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
AUTO = jax.sharding.AxisType.Auto

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest's simulated CPU devices)")


def _mesh(data=4, model=2):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AUTO, AUTO))


RECIPES = [
    (jaxfp4.NVFP4W4A16(), None),
    (jaxfp4.NVFP4W4A4(), 300.0),
    (jaxfp4.NVFP4W4A4(jaxfp4.ActivationQuant.COMPRESSED_TENSORS), 300.0),
    (jaxfp4.MXFP4W4A16(), None),
    (jaxfp4.MXFP4W4A8(), 0.02),
]


def _params(recipe, scale, n=96, k=256):
    w = (jax.random.normal(jax.random.key(0), (n, k)) * 0.05).astype(jnp.bfloat16)
    if recipe.weight_format.value == "nvfp4":  # three fused partitions with different global scales
        q = quantize_nvfp4_llmcompressor([w[:32], w[32:64] * 3, w[64:] * 0.2])
    else:
        q = quantize_mxfp4_llmcompressor(w)
    bias = jax.random.normal(jax.random.key(2), (n,)).astype(jnp.bfloat16)
    return jaxfp4.make_params(q, recipe, input_scale=scale, bias=bias)


def test_per_row_global_scale_is_exact():
    p = _params(jaxfp4.NVFP4W4A16(), None)
    w = per_row_global_scale(p.weight)
    assert w.partitions == (1,) * 96 and w.global_scale.shape == (96,)
    assert np.array_equal(np.asarray(jaxfp4.dequantize(w)), np.asarray(jaxfp4.dequantize(p.weight)))


@pytest.mark.parametrize(("recipe", "scale"), RECIPES, ids=lambda r: getattr(r, "name", str(r)))
@pytest.mark.parametrize("mode", list(Parallel))
@pytest.mark.parametrize("model", [2, 8])
def test_sharded_layer_matches_single_device(recipe, scale, mode, model):
    mesh = _mesh(8 // model, model)
    p = _params(recipe, scale)
    tp = TensorParallel(mesh, "model", mode)
    if mode is Parallel.COLUMN and p.out_features % model:
        pytest.skip("N not divisible")
    x = jax.random.normal(jax.random.key(1), (2, 4, 256)).astype(jnp.bfloat16)
    ref = jaxfp4.fp4_linear(x, p)
    ps = shard_params(p, tp)
    codes_spec = ps.weight.codes.sharding.spec
    assert codes_spec == (P("model", None) if mode is Parallel.COLUMN else P(None, "model"))
    # GSPMD: plain jit over sharded params
    y_jit = jax.jit(jaxfp4.fp4_linear)(x, ps)
    # shard_map: fp4_linear per shard with explicit collectives
    y_map = jax.jit(lambda x, p: tp_linear(x, p, tp))(x, ps)
    for y in (y_jit, y_map):
        assert y.shape == ref.shape and y.dtype == ref.dtype
        if mode is Parallel.COLUMN:
            assert np.array_equal(np.asarray(y), np.asarray(ref))
        else:
            a = (
                np.abs(np.asarray(x, np.float64)).reshape(-1, 256)
                @ np.abs(np.asarray(jaxfp4.dequantize(p.weight, jnp.float32), np.float64)).T
            )
            bound = 2 * 256 * 2.0**-24 * a + 2.0**-8 * np.abs(np.asarray(ref, np.float64)).reshape(a.shape) + 1e-30
            assert np.all(np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64)).reshape(a.shape) <= bound)
    if mode is Parallel.COLUMN:
        assert y_map.sharding.spec[-1] == "model"


def test_pallas_kernel_under_shard_map_interpret():
    mesh = _mesh(4, 2)
    p = _params(jaxfp4.NVFP4W4A16(), None)
    x = jax.random.normal(jax.random.key(1), (3, 256)).astype(jnp.bfloat16)
    with pallas_interpret():
        ref = jaxfp4.fp4_linear(x, p, backend="pallas")
        for mode in Parallel:
            tp = TensorParallel(mesh, "model", mode)
            y = jax.jit(lambda x, p, tp=tp: tp_linear(x, p, tp, backend="pallas"))(x, shard_params(p, tp))
            tol = 0 if mode is Parallel.COLUMN else 2.0**-7 * float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
            assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)))) <= tol


def test_splitting_a_scale_block_is_a_clear_error():
    mesh = _mesh(1, 8)
    p = _params(jaxfp4.MXFP4W4A16(), None, n=96, k=128)  # 128 / 8 = 16 < one 32-block
    with pytest.raises(ValueError, match=r"layer.*split a 32-element scale block.*K=128"):
        shard_params(p, TensorParallel(mesh, "model", Parallel.ROW))
    p = _params(jaxfp4.NVFP4W4A16(), None, n=100, k=128)
    with pytest.raises(ValueError, match=r"N=100 divisible"):
        shard_params(p, TensorParallel(mesh, "model", Parallel.COLUMN))


def test_mesh_axis_checks():
    with pytest.raises(ValueError, match="no axis 'tensor'"):
        TensorParallel(_mesh(), "tensor", Parallel.ROW)
    explicit = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match=r"AxisType\.Auto"):
        TensorParallel(explicit, "model", Parallel.ROW)


def test_fp4linear_tensor_parallel_under_nnx_jit():
    mesh = _mesh(4, 2)
    p = _params(jaxfp4.NVFP4W4A16(), None)
    x = jax.random.normal(jax.random.key(1), (5, 256)).astype(jnp.bfloat16)
    ref = Fp4Linear.from_params(p)(x)
    layer = Fp4Linear.from_params(p, tp=TensorParallel(mesh, "model", Parallel.COLUMN))
    from flax import nnx

    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert np.array_equal(np.asarray(y), np.asarray(ref))


def test_load_checkpoint_places_tensors_on_their_shards():
    mesh = _mesh(4, 2)
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16"), place=checkpoint_placement(mesh, "model"))
    q = ck.quantized["model.layers.0.self_attn.q_proj"]
    o = ck.quantized["model.layers.0.self_attn.o_proj"]
    assert q.weight.codes.sharding == NamedSharding(mesh, P("model", None))
    assert o.weight.scales.sharding == NamedSharding(mesh, P(None, "model"))
    # each device holds only its slice
    shard = q.weight.codes.addressable_shards[0]
    assert shard.data.shape == (q.weight.codes.shape[0] // 2, q.weight.codes.shape[1])
    assert ck.dense["model.embed_tokens.weight"].sharding.is_fully_replicated
    single = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16"))
    for name, prm in ck.quantized.items():
        for a, b in zip(jax.tree.leaves(prm), jax.tree.leaves(single.quantized[name]), strict=True):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert set(LLAMA_PLAN.values()) == {Parallel.COLUMN, Parallel.ROW}


def assert_same_generation(single: Llama, tp: Llama) -> None:
    """Greedy generation by a model and its tensor-parallel twin: row-parallel o/down projections
    re-associate float32 sums (and on a GPU the kernel configs of the shards differ), so logits
    agree within a few bf16 ulps of the logit scale; the tokens are identical on these checkpoints."""
    prompt = jnp.array([[1, 5, 9, 14], [3, 3, 200, 7]], jnp.int32)
    toks_1, logits_1 = generate(single, prompt, max_new_tokens=8)
    toks_t, logits_t = generate(tp, prompt, max_new_tokens=8)
    l1, lt = np.asarray(logits_1), np.asarray(logits_t)
    assert np.max(np.abs(l1 - lt)) <= 4 * 2.0**-8 * np.max(np.abs(l1))
    assert np.array_equal(np.asarray(toks_1), np.asarray(toks_t))


@pytest.mark.parametrize("name", ["ct-nvfp4a16", "ct-nvfp4", "ct-mxfp4a16"])
@pytest.mark.parametrize("fuse", [True, False])
def test_llama_tensor_parallel_matches_single_device(name, fuse):
    mesh = _mesh(4, 2)
    path = os.path.join(FIXTURES, name)
    single = Llama(jaxfp4.load_checkpoint(path))
    ckpt = jaxfp4.load_checkpoint(path, place=checkpoint_placement(mesh, "model"))
    assert ckpt.dense["lm_head.weight"].sharding.spec == P("model", None)  # dense, in the plan: placed split
    tp = Llama(ckpt, tp=TPConfig(mesh, "model"), fuse=fuse)
    qkv = tp.layers[0].self_attn.qkv
    assert qkv.sizes == ((64, 32, 32) if fuse else None)  # fused shard-major under tensor parallelism
    assert qkv.layers[0].weight.get_value().codes.sharding.spec == P("model", None)
    assert tp.layers[0].mlp.down_proj.weight.get_value().codes.sharding.spec == P(None, "model")
    assert tp.lm_head.weight.get_value().sharding.spec == P("model", None)
    assert tp.init_cache(2, 16).k[0].sharding.spec == P(None, None, "model", None)  # split by KV heads
    assert_same_generation(single, tp)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("mode", list(Parallel))
def test_shard_params_lays_out_each_shard_for_the_kernel(fmt, mode):
    mesh = _mesh(4, 2)
    tp = TensorParallel(mesh, "model", mode)
    recipe = jaxfp4.NVFP4W4A16() if fmt == "nvfp4" else jaxfp4.MXFP4W4A16()
    p = _params(recipe, None, n=192, k=512)
    assert shard_params(p, tp).kernel_layout is None  # no layout asked for, none made
    ps = shard_params(jaxfp4.prepare_weights(p), tp)  # a whole-weight layout is replaced by per-shard ones
    kl = ps.kernel_layout
    local = (96, 512) if mode is Parallel.COLUMN else (192, 256)
    assert (kl.shards, (kl.n, kl.k)) == (2, local)
    assert kl.codes.sharding.spec[0] == "model" and kl.codes.addressable_shards[0].data.shape[0] == 1
    for i in range(2):  # each shard's layout is prepare_weights of that shard's own weight
        w = p.weight
        if mode is Parallel.COLUMN:
            w = slice_rows(w, 96 * i, 96 * (i + 1))
        else:
            nb = 256 // w.block_size
            w = dataclasses.replace(
                w, codes=w.codes[:, 128 * i : 128 * (i + 1)], scales=w.scales[:, nb * i : nb * (i + 1)], shape=(192, 256)
            )
        ref = jaxfp4.prepare_weights(jaxfp4.make_params(w, recipe)).kernel_layout
        assert np.array_equal(np.asarray(kl.codes[i]), np.asarray(ref.codes))
        assert np.array_equal(np.asarray(kl.scales[i]), np.asarray(ref.scales))
        assert np.array_equal(np.asarray(kl.row_scale[i]), np.asarray(ref.row_scale))
    assert not pallas.uses_mgpu(ps, 1)  # a stack of shard layouts is only read per shard, by tp_linear
    again = shard_params(ps, tp).kernel_layout  # placing again keeps it
    assert again.shards == 2 and np.array_equal(np.asarray(again.codes), np.asarray(kl.codes))
    x = jax.random.normal(jax.random.key(1), (3, 512)).astype(jnp.bfloat16)
    y = jax.jit(lambda x, p: tp_linear(x, p, tp))(x, ps)
    if mode is Parallel.COLUMN:
        assert np.array_equal(np.asarray(y), np.asarray(jaxfp4.fp4_linear(x, p)))
    other = TensorParallel(mesh, "data", mode)  # a split over 4 devices cannot use 2 shard layouts
    assert shard_params(ps, other, prepare=False).kernel_layout is None
    of = r"\(96, 512\)" if mode is Parallel.COLUMN else r"\(192, 256\)"
    with pytest.raises(ValueError, match=rf"kernel_layout is of 2 shards of a {of} weight, not \(100, 512\)"):
        dataclasses.replace(ps, weight=slice_rows(p.weight, 0, 100), bias=None).validate()


def test_fused_column_layer_is_shard_major_and_exact():
    mesh = _mesh(4, 2)
    tp = TensorParallel(mesh, "model", Parallel.COLUMN)
    parts = [_params(jaxfp4.NVFP4W4A16(), None, n=n, k=256) for n in (128, 96, 96)]
    parts[1] = dataclasses.replace(parts[1], bias=None)  # a missing bias fuses as zeros
    fused = fuse_columns(parts, 2)
    order = [(0, 0, 64), (1, 0, 48), (2, 0, 48), (0, 64, 128), (1, 48, 96), (2, 48, 96)]  # (part, rows) per block
    w_fused = np.asarray(jaxfp4.dequantize(fused))
    w_parts = [np.asarray(jaxfp4.dequantize(p)) for p in parts]
    assert np.array_equal(w_fused, np.concatenate([w_parts[i][a:b] for i, a, b in order]))
    x = jax.random.normal(jax.random.key(1), (2, 3, 256)).astype(jnp.bfloat16)
    ys = split_columns(jax.jit(lambda x, p: tp_linear(x, p, tp))(x, shard_params(fused, tp)), [128, 96, 96], 2)
    for y, p in zip(ys, parts, strict=True):
        assert np.array_equal(np.asarray(y), np.asarray(jaxfp4.fp4_linear(x, p)))
    a, b = jnp.arange(8).reshape(4, 2), 10 + jnp.arange(4).reshape(2, 2)
    assert np.array_equal(np.asarray(shard_major([a, b], 2)), [[0, 1], [2, 3], [10, 11], [4, 5], [6, 7], [12, 13]])
    with pytest.raises(ValueError, match="N=128 divisible by 3"):
        fuse_columns(parts, 3)


def _dense_twin(ckpt):
    """The checkpoint with every quantized layer dequantized to bf16 (a dense model)."""
    dense = dict(ckpt.dense)
    for m, p in ckpt.quantized.items():
        dense[m + ".weight"] = jaxfp4.dequantize(p, jnp.bfloat16)
        if p.bias is not None:
            dense[m + ".bias"] = p.bias
    return dataclasses.replace(ckpt, quantized={}, dense=dense)


def test_dense_llama_tensor_parallel_matches_single_device():
    mesh = _mesh(4, 2)
    ckpt = _dense_twin(jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16")))
    single, tp = Llama(ckpt), Llama(ckpt, tp=TPConfig(mesh, "model"))
    qkv = tp.layers[0].self_attn.qkv
    assert qkv.sizes == (64, 32, 32) and qkv.layers[0].weight.get_value().sharding.spec == P("model", None)
    assert tp.layers[0].mlp.down_proj.weight.get_value().sharding.spec == P(None, "model")
    assert_same_generation(single, tp)


def test_dense_specs_split_or_replicate():
    mesh = _mesh(4, 2)
    col, row = (TensorParallel(mesh, "model", m) for m in (Parallel.COLUMN, Parallel.ROW))
    assert dense_specs(col, (128, 64)) == (P("model", None), P("model"))
    assert dense_specs(row, (128, 64)) == (P(None, "model"), P())
    assert dense_specs(col, (32001, 64)) == (P(), P())  # an odd vocabulary stays whole
    assert dense_specs(row, (128, 63)) == (P(), P())
