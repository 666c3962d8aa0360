"""A compact Llama-family decoder in Flax NNX whose linear layers are jaxfp4 layers.

Built from a checkpoint directory (``config.json`` + :func:`jaxfp4.load_checkpoint`): modules the
checkpoint stores quantized become :class:`~jaxfp4.nn.Fp4Linear` (their recipe, scales and bias as
loaded), the rest (``lm_head``, anything on the ignore list) stay dense. The arithmetic follows HF
transformers' ``LlamaForCausalLM`` (eager attention): RMSNorm in float32, rotary embeddings with
``cos``/``sin`` cast to the activation dtype, softmax in float32, SiLU-gated MLP.

Serving layout (both exact, on by default): projections that read the same input and fuse
exactly (:func:`jaxfp4.ops.fusion_blocker`) run as one layer (q/k/v, gate/up: fewer, larger
GEMMs); on a GPU every quantized weight also gets its kernel layout (:func:`jaxfp4.prepare_weights`,
which keeps a second copy of the codes on the device). Both build new arrays: drop the
:class:`~jaxfp4.checkpoint.Checkpoint` after building the model to free the loaded ones.

Tensor parallelism (:class:`TPConfig`): linear layers split per the plan (Megatron: q/k/v,
gate/up and the LM head by output features, o/down by input features), quantized or dense; fused
projections keep their rows shard-major so that each device computes its own slice of every part
(:func:`jaxfp4.sharding.fuse_columns`); the KV cache is split by KV heads. Quantized layers run per
shard under ``shard_map`` (each shard with its own kernel layout on a GPU), dense ones through
XLA's partitioner.

Decoding runs with a static-shape KV cache (one ``[batch, max_len, kv_heads, head_dim]`` array of
keys and one of values per layer), one jit-compiled prefill + ``lax.scan`` decode loop: no
recompilation per token.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfp4.checkpoint import Checkpoint
from jaxfp4.kernels import attn_triton, norm_triton
from jaxfp4.nn import Fp4Linear
from jaxfp4.ops import SplitKSum, concat_biases, concat_params, fusion_blocker, prepare_weights
from jaxfp4.ops.pallas import interpreting, kernels_run_here
from jaxfp4.sharding import (
    LLAMA_PLAN,
    Parallel,
    TensorParallel,
    dense_specs,
    fuse_columns,
    plan_mode,
    shard_major,
    shard_params,
    split_columns,
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a HF ``LlamaConfig`` the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3 parameters, as sorted items
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_hf(cls, c: dict) -> LlamaConfig:
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (default, llama3)")
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = tuple((k, float(rope[k])) for k in keys)
        eos = c.get("eos_token_id")
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """``1 / theta**(2i/D)`` in float32 (HF ``_compute_default_rope_parameters``), llama3-scaled if set."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_scaling is None:
        return inv
    p = dict(cfg.rope_scaling)
    low_wl = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wl = p["original_max_position_embeddings"] / p["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wl, inv / p["factor"], inv)
    smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
        p["high_freq_factor"] - p["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / p["factor"] + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, scaled)


class DenseLinear(nnx.Module):
    """A dense linear layer kept in PyTorch's ``(N, K)`` orientation; float32 accumulation.
    ``tp``: the weight (and bias) placed split along N (column) or K (row) on its mesh."""

    def __init__(self, weight: jax.Array, bias: jax.Array | None = None, tp: TensorParallel | None = None):
        if tp is not None:
            wspec, bspec = dense_specs(tp, weight.shape)
            weight = jax.device_put(weight, NamedSharding(tp.mesh, wspec))
            bias = None if bias is None else jax.device_put(bias, NamedSharding(tp.mesh, bspec))
        self.weight = nnx.Param(weight)
        self.bias = None if bias is None else nnx.Param(bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight.get_value().astype(x.dtype)
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


def linear_from_checkpoint(
    ckpt: Checkpoint, module: str, backend: str | None, tp: TPConfig | None = None, prepare: bool = False
) -> Fp4Linear | DenseLinear:
    """The module as stored: an :class:`Fp4Linear` if quantized (with its kernel layout when
    ``prepare``), else a :class:`DenseLinear`; tensor-parallel per ``tp``'s plan when given."""
    mtp = tp.for_module(module) if tp else None
    if module in ckpt.quantized:
        p = ckpt.quantized[module]
        if mtp is not None:
            p = shard_params(p, mtp, module, prepare=prepare)
        elif prepare:
            p = prepare_weights(p)
        return Fp4Linear.from_params(p, backend=backend, tp=mtp)
    if module + ".weight" not in ckpt.dense:
        raise KeyError(f"{ckpt.path}: no tensor for module {module!r} (neither quantized nor {module}.weight)")
    return DenseLinear(ckpt.dense[module + ".weight"], ckpt.dense.get(module + ".bias"), mtp)


class Projections(nnx.Module):
    """Linear layers reading the same input (q/k/v, gate/up): one fused layer whose output is split
    at ``sizes`` when they fuse exactly (and ``fuse``): all quantized and :func:`fusion_blocker`
    finds nothing (an :class:`Fp4Linear`), or all dense of one dtype (a :class:`DenseLinear`);
    else each layer on its own (``sizes`` is ``None``). Under ``tp`` they fuse when the plan
    splits all of them along N on the same axis: rows shard-major over ``shards`` devices.
    Calling it returns the list of their outputs either way."""

    def __init__(
        self,
        ckpt: Checkpoint,
        modules: list[str],
        backend: str | None,
        tp: TPConfig | None,
        *,
        fuse: bool,
        prepare: bool,
    ):
        parts = [ckpt.quantized.get(m) for m in modules]
        dense = [ckpt.dense.get(m + ".weight") for m in modules]
        mtp = tp.for_module(modules[0]) if tp else None
        self.shards = 1 if mtp is None else mtp.size
        if tp is not None:  # fused only when every part is split along N the same way, evenly
            rows = [
                p.out_features if p is not None else w.shape[0] if w is not None else 0
                for p, w in zip(parts, dense, strict=True)
            ]
            fuse = fuse and mtp is not None and mtp.mode is Parallel.COLUMN
            fuse = fuse and all(tp.for_module(m) == mtp for m in modules) and all(n % mtp.size == 0 for n in rows)
        if fuse and all(p is not None for p in parts) and fusion_blocker(parts) is None:
            p = concat_params(parts) if mtp is None else fuse_columns(parts, mtp.size, f"{modules[0]} (fused)")
            if mtp is not None:
                p = shard_params(p, mtp, f"{modules[0]} (fused)", prepare=prepare)
            elif prepare:
                p = prepare_weights(p)
            layers = [Fp4Linear.from_params(p, backend=backend, tp=mtp)]
            self.sizes = tuple(q.out_features for q in parts)
        elif fuse and all(w is not None for w in dense) and len({w.dtype for w in dense}) == 1:
            self.sizes = tuple(w.shape[0] for w in dense)
            bias = concat_biases([ckpt.dense.get(m + ".bias") for m in modules], self.sizes)
            if bias is not None and self.shards > 1:
                bias = shard_major(jnp.split(bias, [sum(self.sizes[: i + 1]) for i in range(len(dense) - 1)]), self.shards)
            layers = [DenseLinear(shard_major(dense, self.shards), bias, mtp)]
        else:
            layers = [linear_from_checkpoint(ckpt, m, backend, tp, prepare) for m in modules]
            self.sizes = None
        self.layers = nnx.List(layers)

    @property
    def first(self) -> nnx.Module:
        """The layer that runs first (the fused one, or the first of the list)."""
        return self.layers[0]

    def __call__(self, x: jax.Array, *, prefetch: nnx.Module | None = None) -> list[jax.Array]:
        """``prefetch``: the layer that runs after these (see :func:`linear`); None: no hints,
        also none between the unfused layers."""
        if self.sizes is None:
            nxt = [None] * len(self.layers) if prefetch is None else [*self.layers[1:], prefetch]
            return [linear(layer, x, p) for layer, p in zip(self.layers, nxt, strict=True)]
        return split_columns(linear(self.layers[0], x, prefetch), self.sizes, self.shards)


def linear(layer: nnx.Module, x: jax.Array, prefetch: nnx.Module | None, defer: bool = False) -> jax.Array | SplitKSum:
    """``layer(x)``; an :class:`Fp4Linear` also gets the layer that runs next (``prefetch``, if
    it is one too), whose weight's first tiles its kernel asks into L2 as it finishes
    (:func:`jaxfp4.fp4_linear`'s ``prefetch``; None: no hint), and with ``defer`` may return its
    output before the split-K sum (:meth:`Fp4Linear.deferred`) for the norm kernel to sum."""
    if isinstance(layer, Fp4Linear):
        hint = prefetch if isinstance(prefetch, Fp4Linear) else None
        return layer.deferred(x, prefetch=hint) if defer else layer(x, prefetch=hint)
    return layer(x)


@dataclasses.dataclass(frozen=True)
class TPConfig:
    """Tensor parallelism for the model: quantized linears split along mesh axis ``axis`` per
    ``plan`` (module-name regex -> column/row; default Megatron: q/k/v/gate/up/lm_head column,
    o/down row), quantized or dense; the KV cache split by KV heads (:meth:`cache_sharding`).
    Embeddings and norms are replicated; XLA's partitioner shards the attention and MLP math
    between the layers from their inputs."""

    mesh: Mesh
    axis: str = "model"
    plan: tuple[tuple[str, Parallel], ...] = tuple(LLAMA_PLAN.items())

    def for_module(self, module: str) -> TensorParallel | None:
        mode = plan_mode(module, dict(self.plan))
        return None if mode is None else TensorParallel(self.mesh, self.axis, mode)

    def cache_sharding(self, kv_heads: int) -> NamedSharding:
        """Each layer's KV cache array ``[batch, max_len, kv_heads, head_dim]`` split by KV heads
        (what column-parallel k/v projections produce on each device); replicated if they do not
        split."""
        size = self.mesh.shape[self.axis]
        return NamedSharding(self.mesh, P(None, None, self.axis, None) if kv_heads % size == 0 else P())


def add_rms_norm(x: jax.Array, delta: jax.Array | None, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The residual add and HF ``LlamaRMSNorm`` after it: ``h = x + delta`` (in the activation
    dtype; ``h = x`` when ``delta`` is None) and ``y = weight * normalize(h)``: normalized in
    float32, cast back, then times the weight in the activation dtype. Returns ``(h, y)``.
    :func:`jaxfp4.kernels.norm_triton.add_rms_norm` is its one-kernel twin."""
    h = x if delta is None else x + delta
    f = h.astype(jnp.float32)
    f = f * jax.lax.rsqrt(jnp.mean(f * f, axis=-1, keepdims=True) + eps)
    return h, weight.astype(h.dtype) * f.astype(h.dtype)


def _require_kernels(option: str) -> None:
    """Raise unless Pallas kernels can run here (the model's ``option="pallas"`` paths)."""
    if not kernels_run_here():
        raise ValueError(f"{option}='pallas' needs an NVIDIA GPU (or jaxfp4.ops.pallas_interpret())")


class RMSNorm(nnx.Module):
    """HF ``LlamaRMSNorm`` (:func:`add_rms_norm`); ``kernel``: run it (with the residual add
    before it, :meth:`add`) as one Pallas kernel, :mod:`jaxfp4.kernels.norm_triton`."""

    def __init__(self, weight: jax.Array, eps: float, kernel: bool = False):
        self.weight = nnx.Param(weight)
        self.eps = eps
        self.kernel = kernel

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.add(x, None)[1]

    def add(self, x: jax.Array, delta: jax.Array | SplitKSum | None) -> tuple[jax.Array, jax.Array]:
        """``(x + delta, RMSNorm(x + delta))`` (``delta`` None: ``(x, RMSNorm(x))``; a
        :class:`~jaxfp4.ops.SplitKSum`: its ``resolve()``, summed inside the kernel)."""
        w = self.weight.get_value()
        if self.kernel and norm_triton.supported(x.shape[-1], x.dtype):
            _require_kernels("norm")
            return norm_triton.add_rms_norm(x, delta, w, eps=self.eps, interpret=interpreting())
        if isinstance(delta, SplitKSum):
            delta = delta.resolve()
        return add_rms_norm(x, delta, w, self.eps)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotary embedding ``x * cos + rotate_half(x) * sin`` in the activation dtype;
    ``x [..., head_dim]``, ``cos``/``sin`` broadcastable to it."""
    return x * cos + _rotate_half(x) * sin


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, kv: tuple[jax.Array, jax.Array], pos
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """HF eager attention of ``T`` new tokens at positions ``pos .. pos+T-1`` over a KV cache.

    Args:
      q: ``[B, T, heads, head_dim]``; k, v: ``[B, T, kv_heads, head_dim]``: the projections,
        before the rotary embedding.
      cos, sin: ``[1, T, head_dim]`` in the activation dtype.
      kv: the layer's cache ``(k, v)``, each ``[B, max_len, kv_heads, head_dim]``.

    Returns:
      ``(out [B, T, heads * head_dim], (k, v) with the new tokens written at pos..)``.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    q, k = rope(q, c, s), rope(k, c, s)
    at = (0, pos, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), at)
    v_cache = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), at)
    s_len = k_cache.shape[1]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    # As HF eager: the score matmul's output in the activation dtype, scaled in that dtype,
    # then the softmax in float32.
    scores = (scores.astype(q.dtype) * jnp.asarray(d**-0.5, q.dtype)).astype(jnp.float32)
    q_pos = pos + jnp.arange(t)[:, None]
    visible = jnp.arange(s_len)[None, :] <= q_pos  # causal over the cache
    scores = jnp.where(visible, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_cache, preferred_element_type=jnp.float32).astype(q.dtype)
    return o.reshape(b, t, h * d), (k_cache, v_cache)


def attend_decode(
    q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, kv: tuple[jax.Array, jax.Array], pos, **kw
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """:func:`attend` for one new token per row (``T = 1``, same arguments and results) on
    :func:`jaxfp4.kernels.attn_triton.decode_attention` (``kw``: its options); the caches are
    donated. The rotary embedding and the kernel's one q/k/v operand are made here, in XLA, which
    fuses them into one fusion (for an FP4 layer, the one that sums its kernel's partials)."""
    b, h = q.shape[0], q.shape[2]
    kvh = k.shape[2]
    c, s = cos[0, 0], sin[0, 0]
    q, k = rope(q[:, 0], c, s), rope(k[:, 0], c, s)
    qkv = jnp.concatenate([q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)], axis=-1)
    o, k_cache, v_cache = attn_triton.decode_attention(qkv, kv[0], kv[1], pos, heads=h, kv_heads=kvh, **kw)
    return o[:, None], (k_cache, v_cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values in the activation dtype: per layer one ``[batch, max_len, kv_heads,
    head_dim]`` array each (``k[i]``, ``v[i]`` for layer ``i``).

    One array per layer rather than one stacked ``[layers, ...]`` array: a decode step updates each
    layer's array in place and its attention reads that array as it is, where a stacked cache made
    XLA copy every layer's slice out of it (two device-to-device copies per layer and step)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(
        cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: jnp.dtype, sharding: NamedSharding | None = None
    ) -> KVCache:
        """Zeros; with ``sharding`` placed (or, under ``jit``, constrained) that way."""
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        k = tuple(jnp.zeros(shape, dtype) for _ in range(n))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(n))
        if sharding is not None:
            k, v = jax.lax.with_sharding_constraint((k, v), sharding)
        return cls(k, v)


class Attention(nnx.Module):
    def __init__(
        self,
        ckpt: Checkpoint,
        prefix: str,
        cfg: LlamaConfig,
        backend: str | None,
        tp: TPConfig | None,
        *,
        fuse: bool,
        prepare: bool,
        kernel: bool = False,
        hints: bool = False,
        defer: bool = False,
    ):
        self.cfg, self.hints = cfg, hints
        self.defer = defer  # o_proj's output may stay split-K partials (the next norm kernel sums them)
        self.qkv = Projections(ckpt, [f"{prefix}.{n}_proj" for n in "qkv"], backend, tp, fuse=fuse, prepare=prepare)
        self.o_proj = linear_from_checkpoint(ckpt, f"{prefix}.o_proj", backend, tp, prepare)
        self.kernel = kernel

    def __call__(self, x, cos, sin, kv: tuple[jax.Array, jax.Array], pos, prefetch: nnx.Module | None = None):
        """``kv``: this layer's cache arrays ``(k, v)``; returns ``(output, (k, v) updated)``.
        ``prefetch``: the layer that runs after ``o_proj`` (with ``hints``, see :class:`Block`)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        short = attn_triton.use_kernel(b, kvh, kv[0].shape[1])
        kernel = self.kernel and t == 1 and short and attn_triton.supported(h, kvh, d, x.dtype) and kv[0].dtype == x.dtype
        if kernel:
            _require_kernels("attention")
        q, k, v = self.qkv(x, prefetch=self.o_proj if self.hints else None)
        q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, kvh, d), v.reshape(b, t, kvh, d)
        if kernel:  # one decode token: the whole attention in one kernel
            o, kv = attend_decode(q, k, v, cos, sin, kv, pos, interpret=interpreting())
        else:
            o, kv = attend(q, k, v, cos, sin, kv, pos)
        return linear(self.o_proj, o, prefetch if self.hints else None, self.defer), kv


class MLP(nnx.Module):
    def __init__(
        self,
        ckpt: Checkpoint,
        prefix: str,
        backend: str | None,
        tp: TPConfig | None,
        *,
        fuse: bool,
        prepare: bool,
        hints: bool = False,
        defer: bool = False,
    ):
        self.hints = hints
        self.defer = defer  # down_proj's output may stay split-K partials (the next norm kernel sums them)
        modules = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up = Projections(ckpt, modules, backend, tp, fuse=fuse, prepare=prepare)
        self.down_proj = linear_from_checkpoint(ckpt, f"{prefix}.down_proj", backend, tp, prepare)

    def __call__(self, x, prefetch: nnx.Module | None = None):
        """``prefetch``: the layer that runs after ``down_proj`` (with ``hints``, see :class:`Block`)."""
        # torch's SiLU: x / (1 + exp(-x)) in float32, rounded to the activation dtype, then the
        # product with up_proj in that dtype (jax.nn.silu in bf16 rounds differently).
        g, up = self.gate_up(x, prefetch=self.down_proj if self.hints else None)
        g = g.astype(jnp.float32)
        act = (g / (1.0 + jnp.exp(-g))).astype(x.dtype)
        return linear(self.down_proj, act * up, prefetch if self.hints else None, self.defer)


class Block(nnx.Module):
    def __init__(
        self,
        ckpt: Checkpoint,
        i: int,
        cfg: LlamaConfig,
        backend: str | None,
        tp: TPConfig | None,
        *,
        fuse: bool,
        prepare: bool,
        attn_kernel: bool = False,
        norm_kernel: bool = False,
        hints: bool = False,
    ):
        kw = dict(fuse=fuse, prepare=prepare, hints=hints)
        p = f"model.layers.{i}"
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(ckpt.dense[f"{p}.input_layernorm.weight"], eps, norm_kernel)
        self.post_attention_layernorm = RMSNorm(ckpt.dense[f"{p}.post_attention_layernorm.weight"], eps, norm_kernel)
        # With the norm kernel, o_proj and down_proj may hand it their split-K partials unsummed.
        self.self_attn = Attention(ckpt, f"{p}.self_attn", cfg, backend, tp, **kw, kernel=attn_kernel, defer=norm_kernel)
        self.mlp = MLP(ckpt, f"{p}.mlp", backend, tp, **kw, defer=norm_kernel)

    def __call__(self, x, delta, cos, sin, kv: tuple[jax.Array, jax.Array], pos, prefetch: nnx.Module | None = None):
        """``x``: the residual stream before the previous layer's MLP output ``delta`` is added
        (None: nothing to add), so that the add runs with this layer's first norm. Returns
        ``(residual before this layer's MLP output, that output, (k, v) updated)``.
        ``prefetch``: the layer that runs after this block (the next block's first projection or
        the head). With ``hints`` (the model's ``prefetch`` option) each linear layer's kernel asks
        the L2 cache for the next one's first weight tiles as it finishes."""
        x, y = self.input_layernorm.add(x, delta)
        a, kv = self.self_attn(y, cos, sin, kv, pos, prefetch=self.mlp.gate_up.first)
        x, y = self.post_attention_layernorm.add(x, a)
        return x, self.mlp(y, prefetch), kv


class Llama(nnx.Module):
    """``LlamaForCausalLM`` with jaxfp4 linear layers.

    ``model(tokens, pos, cache)`` runs ``tokens [B, T]`` (int32) at positions ``pos .. pos+T-1``,
    writes their keys/values into ``cache`` and returns ``(logits [B, T, V] float32, cache)``.
    ``tp``: tensor parallelism (:class:`TPConfig`); load the checkpoint with
    ``place=jaxfp4.sharding.checkpoint_placement(mesh, axis)`` so that weights arrive on their shards.
    ``fuse``: run q/k/v and gate/up as one layer each where that is exact.
    ``prepare``: give quantized weights their GPU kernel layout (:func:`jaxfp4.prepare_weights`;
    under ``tp`` one per shard); ``None``: when the default backend is a GPU and ``backend`` is
    not ``"xla"``. Make caches with :meth:`init_cache` (split like the k/v projections under ``tp``).
    ``attention``: ``"pallas"`` runs each decode step's attention (one new token per row: rotary
    embedding, cache update, scores, softmax, values) as one kernel
    (:func:`jaxfp4.kernels.attn_triton.decode_attention`; bf16/fp16, power-of-two head_dim >= 16,
    caches as short as ``attn_triton.use_kernel`` says, not under ``tp``; equal to the ``"xla"``
    path up to float32 summation order), ``"xla"``
    keeps it in jnp (:func:`attend`); ``None``: ``"pallas"`` when the default backend is a GPU.
    Prompts (more than one token) always take :func:`attend`.
    ``norm``: ``"pallas"`` runs each residual add with the RMSNorm after it as one kernel
    (:func:`jaxfp4.kernels.norm_triton.add_rms_norm`; bf16/fp16, not under ``tp``; the residual
    stream bit-equal to the ``"xla"`` path, the normalized values up to the float32 sum's order;
    it also sums o_proj's and down_proj's split-K partials where their decode kernels split K,
    :func:`jaxfp4.ops.fp4_linear_deferred`), ``"xla"`` keeps it in jnp (:func:`add_rms_norm`);
    ``None``: ``"pallas"`` when the default backend is a GPU and there is no ``tp``.
    ``prefetch``: each quantized linear layer's decode kernel asks the L2 cache for the first
    weight tiles of the layer that runs after it as it finishes (``fp4_linear``'s ``prefetch``
    hint: q/k/v -> o_proj -> gate/up -> down_proj -> the next block's q/k/v), so that those HBM
    reads overlap the norms, attention and split-K sums between the GEMMs; no effect on values,
    nor where a layer does not run the Mosaic GPU kernel. ``None``: on when the default backend is
    a GPU and there is no ``tp``.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        backend: str | None = None,
        tp: TPConfig | None = None,
        fuse: bool = True,
        prepare: bool | None = None,
        attention: str | None = None,
        norm: str | None = None,
        prefetch: bool | None = None,
    ):
        for name, v in (("attention", attention), ("norm", norm)):
            if v not in (None, "xla", "pallas"):
                raise ValueError(f"{name} must be None, 'xla' or 'pallas', got {v!r}")
        cfg = LlamaConfig.from_hf(ckpt.config)
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)
        gpu = jax.default_backend() == "gpu"
        if prepare is None:
            prepare = gpu and backend != "xla"

        def kernel(option: str | None) -> bool:  # "pallas", or None on a GPU; never under tp
            return tp is None and (option == "pallas" or (option is None and gpu))

        norm_kernel = kernel(norm)
        hints = (gpu and tp is None) if prefetch is None else bool(prefetch)
        kw = dict(fuse=fuse, prepare=prepare, attn_kernel=kernel(attention), norm_kernel=norm_kernel, hints=hints)
        self.embed_tokens = nnx.Param(ckpt.dense["model.embed_tokens.weight"])
        self.layers = nnx.List([Block(ckpt, i, cfg, backend, tp, **kw) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(ckpt.dense["model.norm.weight"], cfg.rms_norm_eps, norm_kernel)
        if cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.dense and "lm_head" not in ckpt.quantized:
            self.lm_head = DenseLinear(ckpt.dense["model.embed_tokens.weight"], tp=tp.for_module("lm_head") if tp else None)
        else:
            self.lm_head = linear_from_checkpoint(ckpt, "lm_head", backend, tp, prepare)
        self.inv_freq = nnx.Variable(rope_inv_freq(cfg))
        self.tp = tp

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` positions (split by KV heads
        under ``tp``)."""
        sharding = None if self.tp is None else self.tp.cache_sharding(self.cfg.num_key_value_heads)
        return KVCache.init(self.cfg, batch, max_len, self.dtype, sharding)

    def __call__(self, tokens: jax.Array, pos: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        x = self.embed_tokens.get_value()[tokens].astype(self.dtype)
        positions = (pos + jnp.arange(tokens.shape[1], dtype=jnp.int32)).astype(jnp.float32)
        freqs = positions[:, None] * self.inv_freq.get_value()[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)[None]
        cos, sin = jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)
        ks, vs, delta = [], [], None
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].self_attn.qkv.first if i + 1 < len(self.layers) else self.lm_head
            x, delta, (k, v) = layer(x, delta, cos, sin, (cache.k[i], cache.v[i]), pos, nxt)
            ks.append(k)
            vs.append(v)
        logits = self.lm_head(self.norm.add(x, delta)[1]).astype(jnp.float32)
        return logits, KVCache(tuple(ks), tuple(vs))


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "temperature", "top_k", "eos_id"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, cache_len, temperature, top_k, eos_id):
    model = nnx.merge(graphdef, state)
    b, t0 = prompt.shape
    cache = model.init_cache(b, cache_len)
    logits, cache = model(prompt, jnp.int32(0), cache)
    key, sub = jax.random.split(key)
    first = _sample(logits[:, -1], sub, temperature, top_k)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id

    def step(carry, _):
        tok, cache, pos, key, done = carry
        logits, cache = model(tok[:, None], pos, cache)
        key, sub = jax.random.split(key)
        nxt = _sample(logits[:, -1], sub, temperature, top_k)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        return (nxt, cache, pos + 1, key, done), nxt

    carry = (first, cache, jnp.int32(t0), key, done)
    _, rest = jax.lax.scan(step, carry, None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1), logits


def generate(
    model: Llama,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy (``temperature=0``) or sampled decoding, jit-compiled once per shape.

    Args:
      prompt: ``int32 [B, T]`` token ids (all rows the same length).
      max_new_tokens: tokens to produce per row (after ``eos_id``, a row repeats ``eos_id``).

    Returns:
      ``(tokens int32 [B, max_new_tokens], prefill logits float32 [B, T, V])``.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    cache_len = prompt.shape[1] + max_new_tokens
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    return _generate(
        graphdef,
        state,
        prompt,
        key,
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
        temperature=float(temperature),
        top_k=top_k,
        eos_id=eos_id,
    )
