"""MXFP4-weight x FP8-activation GEMM on Hopper's FP8 tensor cores (Pallas, Triton lowering).

Computes ``P[s] = X8[:, Ks] @ (Q * S)[:, Ks].T * 2**-6`` in float32 for each K split ``s``,
where ``X8`` are FP8 E4M3 activation values (the caller multiplies the static activation scale
back), ``Q`` the E2M1 weight values and ``S`` the E8M0 block scales (one per 32 along K). The
caller multiplies ``2**6`` back (exact), sums the splits and adds the bias in float32.

Exactness, step by step (each claim is tested exhaustively in ``tests/kernels``):

* **E2M1 -> E4M3 with bit operations.** Nibble ``s e1 e0 m`` becomes the E4M3 byte
  ``s 0 0 e1 e0 m 0 0``: exponent field ``e1 e0`` and mantissa ``m 0 0``, which is exactly
  ``e2m1 * 2**-6`` (E2M1's bias is 1, E4M3's 7; E2M1's subnormal 0.5 lands on E4M3's subnormal
  ``4/8 * 2**-6``). For the low nibble of a byte ``b``: ``(b & 7) << 2 | (b & 8) << 4``; for the
  high nibble: ``(b >> 2) & 0x1C | b & 0x80``. No tables, no float arithmetic.
* **FP8 x FP8 products are exact** (4 x 4 significant bits fit any float32), and one MMA covers
  exactly one 32-element MXFP4 block (the K of one Hopper FP8 ``wgmma``), started from zero.
* **Block scales in float32.** The block's partial sum is multiplied by ``2**(e - 127)`` (exact:
  a power of two, barring float32 under/overflow) and added to a float32 accumulator. This is
  also the promotion that Hopper's reduced-precision FP8 accumulation needs: no FP8 partial sum
  ever spans more than 32 products.

Folding the scale into the FP8 weight instead (``e2m1 * 2**j`` is exact in E4M3 for ``j`` in
``[-8, 6]``) would need a per-row exponent window of 15 and a fallback where a row's block scales
spread wider; the per-block float32 rescale is exact for every checkpoint, at one multiply-add of
the ``[bm, bn]`` accumulator per 32 K.

Weights stay PyTorch's packed ``(N, K/2)`` bytes (low nibble = even element); the two expanded
halves are interleaved back into natural K order in registers (a Triton ``join``), so the
activations need no permutation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxfp4.formats import codecs
from jaxfp4.kernels.w4a16_triton import BlockConfig, run_k_loop

MX_BLOCK = 32
#: The kernel's partials are the exact product times ``2**-EPILOGUE_EXPONENT``.
EPILOGUE_EXPONENT = 6


def e2m1_to_e4m3_bits(w: jax.Array, hi: bool) -> jax.Array:
    """Packed E2M1 bytes -> uint8 E4M3 bit patterns of ``e2m1 * 2**-6`` for the low (``hi=False``)
    or the high nibble of each byte (exact for all 16 codes; code 8 gives E4M3 -0.0)."""
    if hi:
        return ((w >> 2) & 0x1C) | (w & 0x80)
    return ((w & 0x07) << 2) | ((w & 0x08) << 4)


def expand_block_e4m3(w: jax.Array) -> jax.Array:
    """Packed bytes ``[rows, B]`` -> E4M3 ``[rows, 2B]`` in natural K order (``e2m1 * 2**-6``)."""
    rows, b = w.shape
    both = jnp.stack([e2m1_to_e4m3_bits(w, False), e2m1_to_e4m3_bits(w, True)], axis=-1)
    return jax.lax.bitcast_convert_type(both.reshape(rows, 2 * b), jnp.float8_e4m3fn)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, cfg: BlockConfig, steps: int):
    nb = cfg.bk // MX_BLOCK  # MXFP4 blocks per K step (unrolled)
    n0 = pl.program_id(0) * cfg.bn
    m0 = pl.program_id(1) * cfg.bm
    split = pl.program_id(2)
    nt = (((1,), (1,)), ((), ()))

    def step(i, acc):
        for j in range(nb):
            blk = (split * steps + i) * nb + j
            w = w_ref[pl.ds(n0, cfg.bn), pl.ds(blk * (MX_BLOCK // 2), MX_BLOCK // 2)]
            x = x_ref[pl.ds(m0, cfg.bm), pl.ds(blk * MX_BLOCK, MX_BLOCK)]
            sf = codecs.decode_e8m0(s_ref[pl.ds(n0, cfg.bn), blk])  # [bn] float32 2**(e-127)
            wq = expand_block_e4m3(w)
            if cfg.swap:
                acc = acc + jax.lax.dot_general(wq, x, nt, preferred_element_type=jnp.float32) * sf[:, None]
            else:
                acc = acc + jax.lax.dot_general(x, wq, nt, preferred_element_type=jnp.float32) * sf[None, :]
        return acc

    run_k_loop(o_ref, step, cfg=cfg, steps=steps, n0=n0, m0=m0, split=split)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def mxfp4_fp8_matmul_partials(
    x: jax.Array, codes: jax.Array, scales: jax.Array, *, cfg: BlockConfig, interpret: bool = False
) -> jax.Array:
    """Split-K partial products ``[split_k, Mp, Np]`` float32 of ``x @ (Q*S).T * 2**-6``.

    Shapes must already be padded: ``x`` float8_e4m3fn ``(Mp, K)`` with ``Mp % bm == 0``; ``codes``
    uint8 ``(Np, K/2)`` with ``Np % bn == 0``; ``K % (bk * split_k) == 0`` with ``bk`` a multiple
    of 32; ``scales`` uint8 E8M0 ``(Np, K/32)``. ``cfg.dequant`` must be ``"fp8"``.
    """
    if cfg.dequant != "fp8" or not cfg.mma:
        raise ValueError(f"the FP8 kernel needs dequant='fp8' and mma=True, got {cfg}")
    if cfg.bk % MX_BLOCK:
        raise ValueError(f"bk={cfg.bk} must be a multiple of the MXFP4 block ({MX_BLOCK})")
    if x.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"the FP8 kernel takes float8_e4m3fn activations, got {x.dtype}")
    mp, k = x.shape
    np_ = codes.shape[0]
    steps = k // (cfg.bk * cfg.split_k)
    kernel = functools.partial(_kernel, cfg=cfg, steps=steps)
    grid = (np_ // cfg.bn, mp // cfg.bm, cfg.split_k)
    whole = lambda a: pl.BlockSpec(block_shape=a.shape, index_map=lambda i, j, s: (0,) * a.ndim)
    out_shape = jax.ShapeDtypeStruct((cfg.split_k, np_, mp) if cfg.swap else (cfg.split_k, mp, np_), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[whole(x), whole(codes), whole(scales)],
        out_specs=pl.BlockSpec(block_shape=out_shape.shape, index_map=lambda i, j, s: (0, 0, 0)),
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )(x, codes, scales)
    return jnp.swapaxes(out, 1, 2) if cfg.swap else out
