"""One decode step of Llama attention (HF eager arithmetic) in one Pallas kernel (Triton lowering).

Under XLA a decode step's attention takes about eight kernels per layer on the GPU: the rotary
embedding of q, two cache updates (with k's rotary embedding), the score matmul, the softmax's
maximum and sum, its normalization, and the probability-value matmul. At decode each of them moves
a few kilobytes, so their launches and the gaps between them cost more than their work. Here one
kernel does it all for one new token per row:

* rotary embedding of that token's q and k, each product and the sum rounded to the activation
  dtype as HF's ``q * cos + rotate_half(q) * sin`` is;
* the new k and v written into the cache at ``pos`` (in place: the cache operands are aliased to
  the outputs);
* scores ``q . k`` over the cache in float32, rounded to the activation dtype, scaled by
  ``head_dim ** -0.5`` in that dtype (as HF eager), then in float32 masked to positions
  ``<= pos``; softmax in float32 (maximum, ``exp(s - max)``, the sum, the quotient), the
  probabilities rounded to the activation dtype; ``p . v`` in float32, rounded.

So the kernel computes what :func:`jaxfp4.models.llama.attend` computes for one token, except for
the order of its float32 sums (dot products, the softmax sum) and the float32 ``exp`` and quotient
of the GPU's Triton lowering (fast approximations within a few float32 ulps). Rounding to bf16
hides nearly all of that; where a sum lands on a bf16 rounding boundary, a score or probability
moves by one ulp (``tests/kernels/test_attn_triton.py`` states the tolerance that follows).

One program per (row, query head): it reads its KV head's cache (blocks of ``block`` positions,
only the blocks up to ``pos``: positions past ``pos`` would contribute exact zeros). The program
of a KV head's first query head writes that head's new k and v; every program uses the new k and
v from its registers at ``pos``, so no program depends on another's write.
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


def supported(heads: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether :func:`decode_attention` runs this shape: a power-of-two ``head_dim`` of at least
    16 (the kernel loads halves of a head), whole query groups, bf16 or fp16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0 and jnp.dtype(dtype) in DTYPES


def _rope(a: jax.Array, b: jax.Array, ca, cb, sa, sb, dt) -> tuple[jax.Array, jax.Array]:
    """HF's ``x * cos + rotate_half(x) * sin`` on the halves ``(a, b)`` of ``x``
    (``rotate_half(x) = (-b, a)``), rounding each product and the sum to ``dt`` as HF does."""
    f32 = jnp.float32

    def r(v):
        return v.astype(dt).astype(f32)

    a32, b32 = a.astype(f32), b.astype(f32)
    lo = r(r(a32 * ca.astype(f32)) - r(b32 * sa.astype(f32)))
    hi = r(r(b32 * cb.astype(f32)) + r(a32 * sb.astype(f32)))
    return lo, hi


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "block", "interpret"), donate_argnums=(3, 4))
def decode_attention(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos: jax.Array,
    *,
    heads: int,
    kv_heads: int,
    block: int = 64,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of one new token per row over a KV cache, with the cache update.

    Args:
      qkv: ``[B, (heads + 2 * kv_heads) * head_dim]``: the token's q, k and v projections side by
        side (q's heads first, then k's, then v's; each head ``head_dim`` wide), before the
        rotary embedding.
      cos, sin: ``[head_dim]``: the rotary embedding at ``pos`` (HF's ``cos``/``sin``, in the
        activation dtype).
      k_cache, v_cache: ``[B, max_len, kv_heads, head_dim]``, donated: updated in place.
      pos: int32 scalar, the token's position (``< max_len``); positions ``< pos`` hold the
        earlier tokens' keys and values.
      block: cache positions per step of a program's loops (a power of two).

    Returns:
      ``(out [B, heads * head_dim], k_cache, v_cache)``: the attention output in the activation
      dtype, before ``o_proj``; the caches with the token's k (rotary-embedded) and v at ``pos``.
    """
    b, _, kvh, d = k_cache.shape
    dt = k_cache.dtype
    if kvh != kv_heads or not supported(heads, kv_heads, d, dt):
        raise ValueError(f"decode_attention: unsupported heads={heads}, kv_heads={kv_heads}, cache {k_cache.shape} {dt}")
    if qkv.shape != (b, (heads + 2 * kv_heads) * d) or qkv.dtype != dt or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: qkv {qkv.shape} {qkv.dtype} does not match the cache {k_cache.shape} {dt}")
    g = heads // kv_heads
    half = d // 2
    # HF scales the scores by head_dim ** -0.5 in the activation dtype: that constant, exactly.
    scale = float(np.asarray(d**-0.5, dtype=dt))
    f32 = jnp.float32
    qkv3 = qkv.reshape(b, heads + 2 * kv_heads, d)
    cs = jnp.stack([cos.reshape(d), sin.reshape(d)]).astype(dt)
    pos1 = jnp.asarray(pos, jnp.int32).reshape(1)

    def kernel(pos_ref, cs_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, kc_out, vc_out):
        bi, h = pl.program_id(0), pl.program_id(1)
        kv = h // g
        p = pos_ref[0]
        ca, cb = cs_ref[0, pl.ds(0, half)], cs_ref[0, pl.ds(half, half)]
        sa, sb = cs_ref[1, pl.ds(0, half)], cs_ref[1, pl.ds(half, half)]
        qa, qb = _rope(q_ref[0, 0, pl.ds(0, half)], q_ref[0, 0, pl.ds(half, half)], ca, cb, sa, sb, dt)
        ka, kb = _rope(k_ref[0, 0, pl.ds(0, half)], k_ref[0, 0, pl.ds(half, half)], ca, cb, sa, sb, dt)
        vn = v_ref[0, 0, :].astype(f32)

        @pl.when(h % g == 0)
        def _():
            pl_triton.store(kc_out.at[bi, p, kv, pl.ds(0, half)], ka.astype(dt))
            pl_triton.store(kc_out.at[bi, p, kv, pl.ds(half, half)], kb.astype(dt))
            pl_triton.store(vc_out.at[bi, p, kv, :], vn.astype(dt))

        def scores(i):
            """Scaled, masked float32 scores of positions ``i * block ..`` and their indices."""
            idx = i * block + jnp.arange(block)
            live = idx <= p
            here = (idx == p)[:, None]
            rows = pl.ds(i * block, block)
            lv = jnp.broadcast_to(live[:, None], (block, half))
            ca_ = pl_triton.load(kc_ref.at[bi, rows, kv, pl.ds(0, half)], mask=lv, other=0).astype(f32)
            cb_ = pl_triton.load(kc_ref.at[bi, rows, kv, pl.ds(half, half)], mask=lv, other=0).astype(f32)
            ca_ = jnp.where(here, ka[None, :], ca_)
            cb_ = jnp.where(here, kb[None, :], cb_)
            sc = jnp.sum(ca_ * qa[None, :], axis=1) + jnp.sum(cb_ * qb[None, :], axis=1)
            sc = (sc.astype(dt).astype(f32) * scale).astype(dt).astype(f32)
            return jnp.where(live, sc, -jnp.inf), idx, live, here, rows

        steps = p // block + 1  # blocks holding positions 0..pos

        def mx(i, m):
            return jnp.maximum(m, jnp.max(scores(i)[0]))

        m = jax.lax.fori_loop(0, steps, mx, jnp.float32(-jnp.inf))

        def total(i, acc):
            return acc + jnp.sum(jnp.exp(scores(i)[0] - m))

        den = jax.lax.fori_loop(0, steps, total, jnp.float32(0))

        def pv(i, acc):
            sc, _, live, here, rows = scores(i)
            prob = (jnp.exp(sc - m) / den).astype(dt).astype(f32)
            lv = jnp.broadcast_to(live[:, None], (block, d))
            vb = pl_triton.load(vc_ref.at[bi, rows, kv, :], mask=lv, other=0).astype(f32)
            vb = jnp.where(here, vn[None, :], vb)
            return acc + jnp.sum(prob[:, None] * vb, axis=0)

        acc = jax.lax.fori_loop(0, steps, pv, jnp.zeros((d,), f32))
        o_ref[0, 0, :] = acc.astype(dt)

    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    row = lambda f: pl.BlockSpec((1, 1, d), lambda i, j: (i, f(j), 0))
    out, kc, vc = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, heads, d), dt),
            jax.ShapeDtypeStruct(k_cache.shape, dt),
            jax.ShapeDtypeStruct(v_cache.shape, dt),
        ),
        grid=(b, heads),
        in_specs=[
            whole(pos1),
            whole(cs),
            row(lambda j: j),
            row(lambda j: heads + j // g),
            row(lambda j: heads + kv_heads + j // g),
            whole(k_cache),
            whole(v_cache),
        ],
        out_specs=(row(lambda j: j), whole(k_cache), whole(v_cache)),
        input_output_aliases={5: 1, 6: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(pos1, cs, qkv3, qkv3, qkv3, k_cache, v_cache)
    return out.reshape(b, heads * d), kc, vc
