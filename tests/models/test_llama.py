"""End to end: the Flax Llama on real llm-compressor checkpoints vs transformers + compressed-tensors.

transformers (eager attention) runs the same checkpoint, decompressed by compressed-tensors, in
bf16; W4A4 runs compressed-tensors' activation fake-quant, so jaxfp4 loads it with
``ActivationQuant.COMPRESSED_TENSORS``. With XLA's excess precision off (tests/conftest.py), every
block of the model is bit-identical to transformers (checked layer by layer while writing this);
what remains is the float32 summation order of the GEMMs (XLA vs torch), which can move a bf16
result by one ulp and propagate. Tolerance: 2 bf16 ulps at the top of the logit range
(``2**-7 * max|logit|``), and the same greedy tokens.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import jaxfp4
from jaxfp4.models import Llama, generate
from jaxfp4.models.llama import _generate
from tests.conftest import requires_gpu

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
PROMPT_LEN, NEW = 12, 10


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(4, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def _hf(name: str):
    return AutoModelForCausalLM.from_pretrained(
        os.path.join(FIXTURES, name),
        dtype=torch.bfloat16,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
        attn_implementation="eager",
    )


@pytest.mark.parametrize("name", ["ct-nvfp4a16", "ct-nvfp4", "ct-mxfp4a16"])
@pytest.mark.parametrize("seed", [3, 4])
def test_logits_and_greedy_tokens_match_transformers(name, seed):
    ids = _prompt(seed)
    hf = _hf(name)
    with torch.no_grad():
        ref = hf(ids).logits.float().numpy()
        ref_tokens = hf.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=3)[:, PROMPT_LEN:].numpy()
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, name), activation_mode=jaxfp4.ActivationQuant.COMPRESSED_TENSORS)
    tokens, logits = generate(Llama(ck, dtype=jnp.bfloat16), jnp.asarray(ids.numpy()), max_new_tokens=NEW)
    tol = 2.0**-7 * np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=tol)
    np.testing.assert_array_equal(np.asarray(tokens), ref_tokens)


def test_decode_loop_compiles_once_and_cache_matches_full_recompute():
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16"))
    model = Llama(ck, dtype=jnp.float32)
    prompt = jnp.asarray(_prompt(5).numpy())
    before = _generate._cache_size()
    tokens, _ = generate(model, prompt, max_new_tokens=6)
    generate(model, prompt + 1, max_new_tokens=6)
    assert _generate._cache_size() == before + 1  # one compilation for both calls, not one per token
    # The KV-cache decode equals re-running the whole sequence without a cache (greedy), in f32.
    seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    from jaxfp4.models.llama import KVCache

    full, _ = model(seq, jnp.int32(0), KVCache.init(model.cfg, 2, seq.shape[1], jnp.float32))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full[:, PROMPT_LEN - 1 :], -1)), np.asarray(tokens))


def test_decode_step_reads_the_cache_without_copying_it():
    # Each layer's attention reads its cache array in place: the compiled step (on whatever device
    # runs the tests) has no copy, slice or gather that produces a layer's whole cache. A stacked
    # [layers, ...] cache sliced per layer did (two device-to-device copies per layer and step on
    # the H100, kernels/results/decode-profile-*).
    model = Llama(jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16")), dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, 24)
    layer_shape = ",".join(map(str, cache.k[0].shape[1:]))  # max_len, kv_heads, head_dim

    @jax.jit
    def step(state, cache, tok, pos):
        return nnx.merge(graphdef, state)(tok[:, None], pos, cache)

    hlo = step.lower(state, cache, jnp.ones((1,), jnp.int32), jnp.int32(5)).compile().as_text()
    assert "dynamic-update-slice" in hlo  # the checked text is the step's own
    copies = [
        line
        for line in hlo.splitlines()
        if re.search(r"= \w+\[(1,)*" + layer_shape + r"\]\S* (copy|slice|dynamic-slice|gather)\(", line)
    ]
    assert not copies, copies[:3]


@pytest.mark.parametrize("name", ["ct-nvfp4a16", "ct-mxfp4a16"])
def test_decode_attention_kernel_matches_the_jnp_attention(name):
    # attention="pallas" (jaxfp4.kernels.attn_triton, here in interpret mode) runs each decode
    # step's attention as one kernel: the same greedy tokens as the jnp attention ("xla"), and
    # one decode step's logits within 2 bf16 ulps at the top of the logit range (the kernel's
    # float32 sums run in another order; tests/kernels/test_attn_triton.py bounds that per layer).
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, name))
    ref, ker = Llama(ck, dtype=jnp.bfloat16, attention="xla"), Llama(ck, dtype=jnp.bfloat16, attention="pallas")
    assert ker.layers[0].self_attn.kernel and not ref.layers[0].self_attn.kernel
    prompt = jnp.asarray(_prompt(7).numpy())
    want, _ = generate(ref, prompt, max_new_tokens=8)
    with jaxfp4.ops.pallas_interpret():
        got, _ = generate(ker, prompt, max_new_tokens=8)
        cache = ker.init_cache(2, PROMPT_LEN + 1)
        _, cache = ker(prompt, jnp.int32(0), cache)
        step, _ = ker(want[:, :1], jnp.int32(PROMPT_LEN), cache)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    cache = ref.init_cache(2, PROMPT_LEN + 1)
    _, cache = ref(prompt, jnp.int32(0), cache)
    step_ref, _ = ref(want[:, :1], jnp.int32(PROMPT_LEN), cache)
    tol = 2.0**-7 * float(jnp.abs(step_ref).max())
    np.testing.assert_allclose(np.asarray(step), np.asarray(step_ref), rtol=0, atol=tol)


def test_attention_kernel_only_for_single_tokens_and_short_caches():
    # The kernel runs a decode step (one token) over caches as short as attn_triton.use_kernel
    # says; prompts and longer caches take the jnp attention (where it is faster on the H100).
    from jaxfp4.kernels import attn_triton

    model = Llama(jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16")), dtype=jnp.bfloat16, attention="pallas")

    def uses_kernel(tokens: int, max_len: int, batch: int = 1) -> bool:
        cache = model.init_cache(batch, max_len)
        with jaxfp4.ops.pallas_interpret():
            jaxpr = jax.make_jaxpr(lambda c: model(jnp.ones((batch, tokens), jnp.int32), jnp.int32(0), c))(cache)
        return "name=decode_attention" in str(jaxpr)  # the kernel's jitted wrapper

    assert uses_kernel(1, attn_triton.MAX_LEN)
    assert not uses_kernel(1, attn_triton.MAX_LEN + 1)
    assert not uses_kernel(4, 64)
    many = attn_triton.MANY_PROGRAMS // model.cfg.num_key_value_heads  # rows for that many programs
    assert uses_kernel(1, attn_triton.MAX_LEN_MANY, batch=many)
    assert not uses_kernel(1, attn_triton.MAX_LEN_MANY, batch=many - 1)
    assert not uses_kernel(1, attn_triton.MAX_LEN_MANY + 1, batch=many)


@pytest.mark.parametrize("name", ["ct-nvfp4a16", "ct-mxfp4a16"])
def test_add_norm_kernel_matches_the_jnp_norm(name):
    # norm="pallas" (jaxfp4.kernels.norm_triton, here in interpret mode) runs every residual add
    # and the RMSNorm after it as one kernel, prompts included: the same greedy tokens as the jnp
    # norm, and the prompt's logits within 2 bf16 ulps at the top of the logit range (the
    # normalized values differ by an ulp where the float32 sum's order moves them across a
    # rounding boundary; tests/kernels/test_norm_triton.py bounds that per norm).
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, name))
    ref, ker = Llama(ck, dtype=jnp.bfloat16, norm="xla"), Llama(ck, dtype=jnp.bfloat16, norm="pallas")
    assert ker.layers[0].input_layernorm.kernel and ker.norm.kernel and not ref.norm.kernel
    prompt = jnp.asarray(_prompt(7).numpy())
    want, _ = generate(ref, prompt, max_new_tokens=8)
    with jaxfp4.ops.pallas_interpret():
        got, _ = generate(ker, prompt, max_new_tokens=8)
        logits, _ = ker(prompt, jnp.int32(0), ker.init_cache(2, PROMPT_LEN))
        jaxpr = str(jax.make_jaxpr(lambda c: ker(prompt[:, :1], jnp.int32(0), c))(ker.init_cache(2, 4)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    logits_ref, _ = ref(prompt, jnp.int32(0), ref.init_cache(2, PROMPT_LEN))
    tol = 2 * 2.0**-7 * float(jnp.abs(logits_ref).max())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), rtol=0, atol=tol)
    # One kernel per norm: two per layer and the final one.
    assert jaxpr.count("name=add_rms_norm") == 2 * len(ker.layers) + 1


def test_model_kernels_need_a_gpu_or_interpret_mode():
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16"))
    with pytest.raises(ValueError, match="attention must be"):
        Llama(ck, attention="flash")
    with pytest.raises(ValueError, match="norm must be"):
        Llama(ck, norm="fused")
    if jax.default_backend() != "gpu":
        for kw in (dict(attention="pallas"), dict(norm="pallas")):
            model = Llama(ck, dtype=jnp.bfloat16, **kw)
            with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
                generate(model, jnp.ones((1, 4), jnp.int32), max_new_tokens=2)


@pytest.mark.parametrize(("fuse", "norm"), [(True, "xla"), (False, "xla"), (True, "pallas")])
def test_each_linear_hints_the_layer_that_runs_next(fuse, norm, monkeypatch):
    """With ``prefetch`` each quantized linear passes the next one to ``fp4_linear`` as its L2
    prefetch hint, in the order they run (q/k/v -> o_proj -> gate/up -> down_proj -> the next
    block's q/k/v; the last down_proj none: the head is dense here); without, no hints. With the
    norm kernel, o_proj and down_proj (whose outputs go to it) run as ``Fp4Linear.deferred``,
    which may leave their split-K sums to it; the others as calls."""
    from jaxfp4.nn import Fp4Linear

    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16"))
    calls = []
    original, original_deferred = Fp4Linear.__call__, Fp4Linear.deferred

    def spy(self, x, *, prefetch=None):
        calls.append((self, prefetch, False))
        return original(self, x, prefetch=prefetch)

    def spy_deferred(self, x, *, prefetch=None):
        calls.append((self, prefetch, True))
        return original_deferred(self, x, prefetch=prefetch)

    monkeypatch.setattr(Fp4Linear, "__call__", spy)
    monkeypatch.setattr(Fp4Linear, "deferred", spy_deferred)
    tokens = jnp.ones((1, 3), jnp.int32)
    for hints in (True, False):
        model = Llama(ck, dtype=jnp.bfloat16, fuse=fuse, prefetch=hints, norm=norm)
        order = [
            layer
            for blk in model.layers
            for part in (blk.self_attn.qkv.layers, [blk.self_attn.o_proj], blk.mlp.gate_up.layers, [blk.mlp.down_proj])
            for layer in part
        ]
        assert all(isinstance(layer, Fp4Linear) for layer in order) and len(order) == (4 if fuse else 7) * len(model.layers)
        calls.clear()
        with jaxfp4.ops.pallas_interpret(norm == "pallas"):
            model(tokens, jnp.int32(0), model.init_cache(1, 8))
        assert [c[0] for c in calls] == order
        want = [*order[1:], None] if hints else [None] * len(order)
        assert [c[1] for c in calls] == want
        outs = {id(b.self_attn.o_proj) for b in model.layers} | {id(b.mlp.down_proj) for b in model.layers}
        assert [c[2] for c in calls] == [norm == "pallas" and id(layer) in outs for layer in order]


def test_sampling_is_keyed_and_respects_top_k():
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-mxfp4a16"))
    model = Llama(ck, dtype=jnp.bfloat16)
    prompt = jnp.asarray(_prompt(6).numpy())
    a, _ = generate(model, prompt, max_new_tokens=8, temperature=1.0, key=jax.random.key(1))
    b, _ = generate(model, prompt, max_new_tokens=8, temperature=1.0, key=jax.random.key(1))
    c, _ = generate(model, prompt, max_new_tokens=8, temperature=1.0, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    greedy, _ = generate(model, prompt, max_new_tokens=8)
    top1, _ = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=1, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_eos_stops_a_row():
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, "ct-nvfp4a16"))
    model = Llama(ck, dtype=jnp.bfloat16)
    prompt = jnp.asarray(_prompt(3).numpy())
    greedy, _ = generate(model, prompt, max_new_tokens=6)
    eos = int(greedy[0, 2])
    stopped, _ = generate(model, prompt, max_new_tokens=6, eos_id=eos)
    row = np.asarray(stopped[0])
    first = int(np.argmax(row == eos))
    assert (row[first:] == eos).all()
    np.testing.assert_array_equal(row[: first + 1], np.asarray(greedy[0, : first + 1]))


@pytest.mark.parametrize("name", ["ct-nvfp4", "ct-nvfp4a16"])
def test_every_linear_equals_transformers_on_its_captured_input(name):
    """Layer level, per scheme: each quantized Linear's input and output captured inside
    transformers + compressed-tensors (bf16, W4A4 with CT's activation fake-quant); jaxfp4's
    ``fp4_linear`` on the same input gives the same bf16 output, bit for bit (observed; both
    accumulate the K<=128 products in float32)."""
    from tests.torch_bridge import bits, to_np

    hf = _hf(name)
    captured = {}
    for mod_name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name != "lm_head":
            mod.register_forward_hook(lambda m, i, o, n=mod_name: captured.__setitem__(n, (i[0].clone(), o.clone())))
    with torch.no_grad():
        hf(_prompt(3))
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, name), activation_mode=jaxfp4.ActivationQuant.COMPRESSED_TENSORS)
    assert sorted(captured) == sorted(ck.quantized)
    for mod_name, (x, y) in captured.items():
        got = jaxfp4.fp4_linear(jnp.asarray(to_np(x)), ck.quantized[mod_name], backend="xla")
        np.testing.assert_array_equal(bits(np.asarray(got)), bits(to_np(y)), err_msg=mod_name)


@pytest.mark.parametrize("name", ["ct-nvfp4", "ct-mxfp4a16"])
def test_fused_projections_match_separate_layers(name):
    """q/k/v and gate/up fused (the default) vs run one by one: each output column is the same
    dot product (tests/ops/test_concat_params.py), so logits agree within the same 2-ulp bound
    as against transformers, and greedy tokens are equal."""
    ck = jaxfp4.load_checkpoint(os.path.join(FIXTURES, name), activation_mode=jaxfp4.ActivationQuant.COMPRESSED_TENSORS)
    fused, separate = Llama(ck), Llama(ck, fuse=False)
    assert fused.layers[0].self_attn.qkv.sizes is not None and fused.layers[0].mlp.gate_up.sizes is not None
    assert separate.layers[0].self_attn.qkv.sizes is None
    prompt = jnp.asarray(_prompt(5).numpy())
    t1, l1 = generate(fused, prompt, max_new_tokens=NEW)
    t2, l2 = generate(separate, prompt, max_new_tokens=NEW)
    l1, l2 = np.asarray(l1), np.asarray(l2)
    assert np.max(np.abs(l1 - l2)) <= 2.0**-7 * np.abs(l2).max()
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))


@requires_gpu
def test_gpu_kernels_match_the_jnp_paths_on_a_llama3_8b_shaped_model():
    # On the GPU with every kernel the model has (Mosaic GPU linears, o_proj's and down_proj's
    # split-K partials summed by the add + norm kernel, the attention kernel) against the same
    # weights with attention and norm in jnp: one decode step's logits within 2 bf16 ulps at the
    # top of the logit range (the kernels' float32 sums run in other orders; their own tests
    # bound each).
    from kernels.bench_llama import llama3_8b, random_checkpoint

    ck = random_checkpoint(llama3_8b(2, 1024), fp4=True)
    ker = Llama(ck, dtype=jnp.bfloat16)
    ref = Llama(ck, dtype=jnp.bfloat16, attention="xla", norm="xla")
    for layer in (ker.layers[0].self_attn.o_proj, ker.layers[0].mlp.down_proj):  # the path under test
        x = jnp.ones((1, 1, layer.in_features), jnp.bfloat16)
        assert isinstance(layer.deferred(x), jaxfp4.ops.SplitKSum)
    prompt = jax.random.randint(jax.random.key(0), (1, 9), 0, 1024, jnp.int32)
    out = {}
    for name, model in (("ker", ker), ("ref", ref)):
        cache = model.init_cache(1, 16)
        _, cache = model(prompt[:, :8], jnp.int32(0), cache)
        out[name], _ = model(prompt[:, 8:], jnp.int32(8), cache)
    tol = 2 * 2.0**-7 * float(jnp.abs(out["ref"]).max())
    np.testing.assert_allclose(np.asarray(out["ker"]), np.asarray(out["ref"]), rtol=0, atol=tol)
