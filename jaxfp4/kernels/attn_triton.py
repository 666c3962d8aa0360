"""One decode step of Llama attention (HF eager arithmetic) in one Pallas kernel (Triton lowering).

Under XLA a decode step's attention takes about eight kernels per layer on the GPU: the rotary
embedding of q, two cache updates (with k's rotary embedding), the score matmul, the softmax's
maximum and sum, its normalization, and the probability-value matmul. At decode each of them moves
a few kilobytes, so their launches and the gaps between them cost more than their work. The
rotary embedding stays in XLA (:func:`jaxfp4.models.llama.rope`: it fuses into the kernel or
epilogue that produces q/k/v), and one kernel does the rest for one new token per row:

* the new k and v written into the cache at ``pos`` (in place: the cache operands are aliased to
  the outputs);
* scores ``q . k`` over the cache in float32 (tensor-core products of the bf16/fp16 operands,
  exact, summed in float32), rounded to the activation dtype, scaled by ``head_dim ** -0.5`` in
  that dtype (as HF eager), then in float32 masked to positions ``<= pos``; softmax in float32
  (maximum, ``exp(s - max)``, the sum, the quotient), the probabilities rounded to the activation
  dtype; ``p . v`` summed in float32, rounded.

So the kernel computes what :func:`jaxfp4.models.llama.attend` computes for one token, except for
the order of its float32 sums (dot products, the softmax sum) and the float32 ``exp`` and quotient
of the GPU's Triton lowering (fast approximations within a few float32 ulps). Rounding to bf16
hides nearly all of that; where a sum lands on a bf16 rounding boundary, a score or probability
moves by one ulp (``tests/kernels/test_attn_triton.py`` states the tolerance that follows).

One program per (row, KV head), its query heads as the rows of the products (padded to 16). It
reads its head's cache in blocks of up to 256 positions, only the blocks up to ``pos`` (positions
past ``pos`` would contribute exact zeros), three times (maximum, sum, values: HF's softmax
normalizes by the exact maximum and sum, which an online softmax would round differently); a
decode cache of up to 256 positions is one block, read once, and the three steps run on it in
registers. The new k and v are used from registers at ``pos``. With batch x KV-heads programs
and three passes it is a short-cache kernel: the model uses it where it was measured faster
(:func:`use_kernel`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

#: Dtypes the kernel takes (activations and cache).
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

#: Longest cache the model sends to the kernel with few programs (batch x KV heads < 128), and
#: with many. On the H100 (``results/attention-*.json``, GPU time with the rotary-embedding fusion,
#: Llama-3-8B heads: 8 KV heads) the kernel beat the jnp attention at batch 1 up to 256 positions
#: (10.5 / 11.1 vs 12.9 / 13.6 us at 160 / 256) and lost from 512 (19.3 vs 14.1 us; 37 vs 16 at
#: 1024): its 8 programs read the whole cache three times each, where XLA's kernels spread it over
#: the GPU. At batch 16 (128 programs) it won at every length measured (13.8 vs 39.5 us at 256,
#: 26.4 vs 70.8 at 512, 53.8 vs 141.7 at 1024).
MAX_LEN = 256
MAX_LEN_MANY = 1024
MANY_PROGRAMS = 128


def use_kernel(batch: int, kv_heads: int, max_len: int) -> bool:
    """Whether the model runs a decode step's attention on this kernel: where it was measured
    faster than the jnp attention (:data:`MAX_LEN`)."""
    return max_len <= (MAX_LEN_MANY if batch * kv_heads >= MANY_PROGRAMS else MAX_LEN)


def supported(heads: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether :func:`decode_attention` runs this shape: a power-of-two ``head_dim`` of at least
    16 (the tensor-core products' depth), at most 16 query heads per KV head, bf16 or fp16."""
    return (
        head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and heads % kv_heads == 0
        and heads // kv_heads <= 16
        and jnp.dtype(dtype) in DTYPES
    )


def _block(max_len: int) -> int:
    """Cache positions per block: ``max_len`` rounded up to a power of two, from 16 to 256."""
    return min(256, max(16, 1 << (max_len - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "block", "num_warps", "interpret"), donate_argnums=(1, 2))
def decode_attention(
    qkv: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos: jax.Array,
    *,
    heads: int,
    kv_heads: int,
    block: int | None = None,
    num_warps: int = 8,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of one new token per row over a KV cache, with the cache update.

    Args:
      qkv: ``[B, (heads + 2 * kv_heads) * head_dim]``: the token's q, k and v side by side (q's
        heads first, then k's, then v's; each head ``head_dim`` wide), q and k after the rotary
        embedding.
      k_cache, v_cache: ``[B, max_len, kv_heads, head_dim]``, donated: updated in place.
      pos: int32 scalar, the token's position (``< max_len``; clamped into the cache as
        ``dynamic_update_slice`` clamps); positions ``< pos`` hold the earlier tokens' keys and
        values.
      block: cache positions per step of a program's loops (a power of two, at least 16;
        default :func:`_block`).
      num_warps: warps per program (8 was the fastest on the H100, ``kernels/bench_attention.py``).

    Returns:
      ``(out [B, heads * head_dim], k_cache, v_cache)``: the attention output in the activation
      dtype, before ``o_proj``; the caches with the token's k and v at ``pos``.
    """
    b, s_len, kvh, d = k_cache.shape
    dt = k_cache.dtype
    if kvh != kv_heads or not supported(heads, kv_heads, d, dt):
        raise ValueError(f"decode_attention: unsupported heads={heads}, kv_heads={kv_heads}, cache {k_cache.shape} {dt}")
    if qkv.shape != (b, (heads + 2 * kv_heads) * d) or qkv.dtype != dt or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: qkv {qkv.shape} {qkv.dtype} does not match the cache {k_cache.shape} {dt}")
    block = _block(s_len) if block is None else block
    g = heads // kv_heads
    gp = 16  # query rows per program: the group, zero-padded to the products' minimum
    # HF scales the scores by head_dim ** -0.5 in the activation dtype: that constant, exactly.
    scale = float(np.asarray(d**-0.5, dtype=dt))
    f32 = jnp.float32
    qkv3 = qkv.reshape(b, heads + 2 * kv_heads, d)
    pos1 = jnp.asarray(pos, jnp.int32).reshape(1)

    def kernel(pos_ref, qkv_ref, kc_ref, vc_ref, o_ref, kc_out, vc_out):
        bi, kv = pl.program_id(0), pl.program_id(1)
        p = jnp.clip(pos_ref[0], 0, s_len - 1)  # as dynamic_update_slice clamps (and no write out of bounds)
        group = jnp.broadcast_to((jnp.arange(gp) < g)[:, None], (gp, d))  # the group's real query rows
        q = pl_triton.load(qkv_ref.at[bi, pl.ds(kv * g, gp), :], mask=group, other=0)
        kn = qkv_ref[bi, heads + kv, :]
        vn = qkv_ref[bi, heads + kv_heads + kv, :]
        pl_triton.store(kc_out.at[bi, p, kv, :], kn)
        pl_triton.store(vc_out.at[bi, p, kv, :], vn)

        def tile(ref, new, i, live, here):
            """Positions ``i * block ..`` of a cache (zeros past ``pos``, the new row at ``pos``)."""
            t = pl_triton.load(
                ref.at[bi, pl.ds(i * block, block), kv, :], mask=jnp.broadcast_to(live[:, None], (block, d)), other=0
            )
            return jnp.where(here[:, None], new[None, :], t)

        def scores(i):
            """Scaled, masked float32 scores ``[gp, block]`` of positions ``i * block ..``."""
            idx = i * block + jnp.arange(block)
            live, here = idx <= p, idx == p
            sc = pl_triton.dot(q, tile(kc_ref, kn, i, live, here), trans_b=True)
            sc = (sc.astype(dt).astype(f32) * scale).astype(dt).astype(f32)
            return jnp.where(live[None, :], sc, -jnp.inf), live, here

        if s_len <= block:  # the whole cache is one block: one load of each, one pass
            sc, live, here = scores(0)
            m = jnp.max(sc, axis=1)
            e = jnp.exp(sc - m[:, None])
            prob = (e / jnp.sum(e, axis=1)[:, None]).astype(dt)
            acc = pl_triton.dot(prob, tile(vc_ref, vn, 0, live, here))
        else:
            steps = p // block + 1  # blocks holding positions 0..pos

            def mx(i, m):
                return jnp.maximum(m, jnp.max(scores(i)[0], axis=1))

            m = jax.lax.fori_loop(0, steps, mx, jnp.full((gp,), -jnp.inf, f32))

            def total(i, acc):
                return acc + jnp.sum(jnp.exp(scores(i)[0] - m[:, None]), axis=1)

            den = jax.lax.fori_loop(0, steps, total, jnp.zeros((gp,), f32))

            def pv(i, acc):
                sc, live, here = scores(i)
                prob = (jnp.exp(sc - m[:, None]) / den[:, None]).astype(dt)
                return acc + pl_triton.dot(prob, tile(vc_ref, vn, i, live, here))

            acc = jax.lax.fori_loop(0, steps, pv, jnp.zeros((gp, d), f32))
        pl_triton.store(o_ref.at[bi, pl.ds(kv * g, gp), :], acc.astype(dt), mask=group)

    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    out_shape = jax.ShapeDtypeStruct((b, heads, d), dt)
    out, kc, vc = pl.pallas_call(
        kernel,
        out_shape=(out_shape, jax.ShapeDtypeStruct(k_cache.shape, dt), jax.ShapeDtypeStruct(v_cache.shape, dt)),
        grid=(b, kv_heads),
        in_specs=[whole(pos1), whole(qkv3), whole(k_cache), whole(v_cache)],
        out_specs=(whole(out_shape), whole(k_cache), whole(v_cache)),
        input_output_aliases={2: 1, 3: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(pos1, qkv3, k_cache, v_cache)
    return out.reshape(b, heads * d), kc, vc
