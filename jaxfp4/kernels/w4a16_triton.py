"""FP4-weight x bf16-activation GEMM for NVIDIA GPUs, in Pallas lowered through Triton.

Computes ``P[s] = X[:, Ks] @ (Q * S)[:, Ks].T`` in float32 for each K split ``s``, where ``Q``
are the E2M1 weight values and ``S`` the per-block scales (E4M3 per 16 or E8M0 per 32 along K).
The caller sums the splits and applies the per-row global multiplier and bias in float32.

Layout and tricks:
* Packed weights stay PyTorch's ``(N, K/2)`` bytes; the low nibble of byte ``j`` is element
  ``2j``. Instead of interleaving nibbles in registers, the activations are split into their even
  and odd columns (``X_even``, ``X_odd``, ``(M, K/2)`` each) and the kernel does two dots per
  K step: ``X_even @ lo.T + X_odd @ hi.T``.
* E2M1 -> float by integer bit operations (:func:`jaxfp4.formats.codecs.decode_e2m1`), times the
  block scale in float32, rounded to bf16: exact, because an E2M1 value times an E4M3 or E8M0
  scale has at most 6 significant bits (bf16 has 8) and stays within bf16's range.
* Split-K on the grid so that decode shapes (few rows of X) still spread weight streaming over
  every SM; splits are reduced by the caller (deterministic, no atomics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxfp4.formats import codecs


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes: ``bm`` rows of X, ``bn`` rows of W, ``bk`` K elements per step; ``split_k``
    K partitions on the grid; Triton's ``num_warps`` and ``num_stages``."""

    bm: int
    bn: int
    bk: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def _kernel(xe_ref, xo_ref, w_ref, s_ref, o_ref, *, cfg: BlockConfig, steps: int, block: int, mx: bool):
    bkh = cfg.bk // 2  # bytes of a weight row per step
    nsb = cfg.bk // block  # block scales per row per step
    n0 = pl.program_id(0) * cfg.bn
    m0 = pl.program_id(1) * cfg.bm
    split = pl.program_id(2)

    def step(i, acc):
        kb = (split * steps + i) * bkh
        w = w_ref[pl.ds(n0, cfg.bn), pl.ds(kb, bkh)]
        s = s_ref[pl.ds(n0, cfg.bn), pl.ds((split * steps + i) * nsb, nsb)]
        sf = codecs.decode_e8m0(s) if mx else codecs.decode_e4m3(s)
        sf = jnp.broadcast_to(sf[:, :, None], (cfg.bn, nsb, block // 2)).reshape(cfg.bn, bkh)
        lo = (codecs.decode_e2m1(w & 0xF) * sf).astype(jnp.bfloat16)
        hi = (codecs.decode_e2m1(w >> 4) * sf).astype(jnp.bfloat16)
        xe = xe_ref[pl.ds(m0, cfg.bm), pl.ds(kb, bkh)]
        xo = xo_ref[pl.ds(m0, cfg.bm), pl.ds(kb, bkh)]
        acc = acc + jax.lax.dot_general(xe, lo, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc + jax.lax.dot_general(xo, hi, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((cfg.bm, cfg.bn), jnp.float32))
    o_ref[split, pl.ds(m0, cfg.bm), pl.ds(n0, cfg.bn)] = acc


@functools.partial(jax.jit, static_argnames=("cfg", "mx", "interpret"))
def fp4_matmul_partials(
    x: jax.Array, codes: jax.Array, scales: jax.Array, *, cfg: BlockConfig, mx: bool, interpret: bool = False
) -> jax.Array:
    """Split-K partial products ``[split_k, Mp, Np]`` float32 of ``x @ (Q*S).T``.

    Shapes must already be padded: ``x`` bf16 ``(Mp, K)`` with ``Mp % bm == 0``; ``codes`` uint8
    ``(Np, K/2)`` with ``Np % bn == 0``; ``K % (bk * split_k) == 0``; ``scales`` E4M3 ``(Np, K/16)``
    (``mx=False``) or uint8 E8M0 ``(Np, K/32)`` (``mx=True``).
    """
    mp, k = x.shape
    np_ = codes.shape[0]
    block = 32 if mx else 16
    steps = k // (cfg.bk * cfg.split_k)
    xe, xo = x[:, 0::2], x[:, 1::2]
    kernel = functools.partial(_kernel, cfg=cfg, steps=steps, block=block, mx=mx)
    grid = (np_ // cfg.bn, mp // cfg.bm, cfg.split_k)
    whole = lambda a: pl.BlockSpec(block_shape=a.shape, index_map=lambda i, j, s: (0,) * a.ndim)
    out_shape = jax.ShapeDtypeStruct((cfg.split_k, mp, np_), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[whole(xe), whole(xo), whole(codes), whole(scales)],
        out_specs=pl.BlockSpec(block_shape=out_shape.shape, index_map=lambda i, j, s: (0, 0, 0)),
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )(xe, xo, codes, scales)
