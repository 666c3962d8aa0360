"""Tensor parallelism on real GPUs (skipped without two): each shard runs the Mosaic GPU kernel on
its own kernel layout under ``shard_map``; results against the single-device "xla" reference within
tests/kernels/test_w4a16.py's derived bound (its float32 term covers any summation order, so the
row-parallel sum across devices too), and a tensor-parallel Llama against the same model on one GPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxfp4
from jaxfp4.models.llama import Llama, TPConfig
from jaxfp4.sharding import Parallel, TensorParallel, checkpoint_placement, shard_params, tp_linear
from tests.kernels.test_w4a16 import RECIPES, _check_against_reference, _params
from tests.test_sharding import assert_same_generation

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GPUS = [d for d in jax.devices() if d.platform == "gpu"]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(len(GPUS) < 2, reason="needs two GPUs")]


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,), devices=GPUS[:2])


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
@pytest.mark.parametrize("mode", list(Parallel))
@pytest.mark.parametrize(("m", "n", "k"), [(1, 768, 2048), (16, 4096, 4096), (37, 640, 1024)])
def test_each_shard_runs_the_kernel_on_its_layout(recipe, mode, m, n, k):
    tp = TensorParallel(_mesh(), "model", mode)
    p = _params(recipe, n, k, fused=True)
    ps = shard_params(p, tp, prepare=True)
    assert ps.kernel_layout is not None and ps.kernel_layout.shards == 2
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x, p: tp_linear(x, p, tp))
    hlo = f.lower(x, ps).as_text()
    assert "mosaic_gpu" in hlo and "triton" not in hlo  # the Mosaic kernel, per shard, no fallback
    y = f(x, ps)
    if mode is Parallel.COLUMN:
        assert y.sharding.spec[-1] == "model"
    _check_against_reference(x, p, jax.device_get(y))


@pytest.mark.parametrize("name", ["ct-nvfp4a16", "ct-nvfp4"])
def test_llama_on_two_gpus_matches_one(name):
    path = os.path.join(FIXTURES, name)
    single = Llama(jaxfp4.load_checkpoint(path))  # kernel layouts on one GPU
    mesh = _mesh()
    tp = Llama(jaxfp4.load_checkpoint(path, place=checkpoint_placement(mesh, "model")), tp=TPConfig(mesh, "model"))
    qkv = tp.layers[0].self_attn.qkv.layers[0]
    assert qkv.kernel_layout is not None and qkv.kernel_layout.get_value().shards == 2
    assert qkv.weight.get_value().codes.sharding.spec == P("model", None)
    assert_same_generation(single, tp)
