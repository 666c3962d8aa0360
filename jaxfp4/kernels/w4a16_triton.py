"""FP4-weight x bf16-activation GEMM for NVIDIA GPUs, in Pallas lowered through Triton.

Computes ``P[s] = X[:, Ks] @ (Q * S)[:, Ks].T * 2**-c`` in float32 for each K split ``s``, where
``Q`` are the E2M1 weight values, ``S`` the per-block scales (E4M3 per 16 or E8M0 per 32 along
K) and ``c`` the power of two :func:`epilogue_exponent` returns (the caller multiplies it back,
exactly, with the per-row global multiplier, sums the splits and adds the bias in float32).

Layout and tricks:
* Packed weights stay PyTorch's ``(N, K/2)`` bytes; the low nibble of byte ``j`` is element
  ``2j``. Instead of interleaving nibbles in registers, the activations are split into their even
  and odd columns (``X_even``, ``X_odd``, ``(M, K/2)`` each) and the kernel does two dots per
  K step: ``X_even @ lo.T + X_odd @ hi.T``.
* ``swap=True`` computes the transposed product ``(Q*S) @ X.T`` so that the expanded weight tile
  is the dot's left operand (the operand Hopper's wgmma can take from registers) and the few
  activation rows of a decode step are the narrow N side of the MMA.
* E2M1 expansion (``dequant``):
  - ``"f32"``: decode to float32 with integer bit operations
    (:func:`jaxfp4.formats.codecs.decode_e2m1`), multiply by the scale, round to bf16.
  - ``"bits"``: place the nibble's 3 magnitude bits at bf16 bits 6-8 and its sign at bit 15: the
    bf16 with those bits is exactly ``e2m1 * 2**-126`` (E2M1's bias is 1, bf16's 127; E2M1's
    subnormal 0.5 lands on bf16's subnormal 2**-127). One bf16 multiply by
    ``scale * 2**(126 - c)`` (``c = 8`` for E4M3, ``7`` for E8M0) gives ``e2m1 * scale * 2**-c``,
    exactly: the product has at most 6 significant bits and, for E4M3 scales and E8M0 exponents
    in ``[9, 135]``, lies in bf16's normal range.
  - ``"asm"``: the same bits built by inline PTX four bytes at a time (``prmt`` spreads bytes to
    16-bit lanes, shifts and masks place magnitude and sign).
  On the GPU bf16 multiplies keep subnormals; XLA:CPU flushes them, so interpret mode computes the
  same exact products through float32 (the expansion's bit patterns are tested separately).
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

DEQUANT_MODES = ("f32", "bits", "asm")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes: ``bm`` rows of X, ``bn`` rows of W, ``bk`` K elements per step; ``split_k``
    K partitions on the grid; Triton's ``num_warps`` and ``num_stages``; ``swap`` computes
    ``W @ X.T`` (weights as the dot's left operand); ``dequant`` one of :data:`DEQUANT_MODES`;
    ``mma=False`` (``bm`` must be 1) multiplies on the CUDA cores instead of the tensor cores: a
    float32 ``[bn, bk/2]`` accumulator of elementwise products, reduced once at the end (GEMV).
    ``dequant="fp8"`` selects the MXFP4 x FP8 kernel of :mod:`jaxfp4.kernels.w4a8_triton`
    (FP8 activations, FP8 tensor cores) for the same tile fields."""

    bm: int
    bn: int
    bk: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = False
    dequant: str = "f32"
    mma: bool = True


def epilogue_exponent(cfg: BlockConfig, mx: bool) -> int:
    """``c`` such that the kernel's partials are the exact product times ``2**-c``."""
    if cfg.dequant == "f32":
        return 0
    if cfg.dequant == "fp8":
        from jaxfp4.kernels.w4a8_triton import EPILOGUE_EXPONENT  # that module imports this one

        return EPILOGUE_EXPONENT
    return 7 if mx else 8


def _scale_factor(s: jax.Array, cfg: BlockConfig, mx: bool) -> jax.Array:
    """Block scales -> the float the expanded nibbles are multiplied by (f32 or bf16)."""
    sf = codecs.decode_e8m0(s) if mx else s.astype(jnp.float32)  # E4M3 -> f32: exact (Triton cvt)
    if cfg.dequant == "f32":
        return sf
    return (sf * jnp.float32(2.0 ** (126 - epilogue_exponent(cfg, mx)))).astype(jnp.bfloat16)


# Four bytes in one register -> four bf16 (two registers) holding e2m1 * 2**-126 of either the
# low or the high nibble of each byte. prmt 0x4140 / 0x4342 moves bytes 0,1 / 2,3 into the low
# byte of each 16-bit lane; the magnitude bits go to 6-8, the sign bit to 15.
_ASM_BODY = """
{{
.reg .b32 n, a, b, t, u;
{select}
prmt.b32 a, n, 0, 0x4140;
prmt.b32 b, n, 0, 0x4342;
shl.b32 t, a, 6;
shl.b32 u, a, 12;
and.b32 t, t, 0x01C001C0;
and.b32 u, u, 0x80008000;
or.b32 $0, t, u;
shl.b32 t, b, 6;
shl.b32 u, b, 12;
and.b32 t, t, 0x01C001C0;
and.b32 u, u, 0x80008000;
or.b32 $1, t, u;
}}
"""
_ASM_LO = _ASM_BODY.format(select="and.b32 n, $2, 0x0F0F0F0F;")
_ASM_HI = _ASM_BODY.format(select="shr.b32 n, $2, 4;\nand.b32 n, n, 0x0F0F0F0F;")


def _expand_bits(w: jax.Array, hi: bool, asm: bool) -> jax.Array:
    """Packed bytes -> bf16 ``e2m1 * 2**-126`` of the low (``hi=False``) or high nibbles."""
    if asm:
        (out,) = pl_triton.elementwise_inline_asm(
            _ASM_HI if hi else _ASM_LO,
            args=[w],
            constraints="=r,=r,r",
            pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)],
        )
        return out
    w16 = w.astype(jnp.uint16)
    if hi:
        bits = ((w16 & 0x70) << 2) | ((w16 & 0x80) << 8)
    else:
        bits = ((w16 & 0x7) << 6) | ((w16 & 0x8) << 12)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def _expand(w: jax.Array, sf: jax.Array, hi: bool, cfg: BlockConfig, interpret: bool) -> jax.Array:
    """Packed bytes ``[..., B]`` and a broadcastable scale -> bf16 weights of one nibble half."""
    nib = (w >> 4) if hi else (w & 0xF)
    if cfg.dequant == "f32":
        return (codecs.decode_e2m1(nib) * sf).astype(jnp.bfloat16)
    if interpret:
        # XLA:CPU flushes subnormals, and e2m1 0.5 * 2**-126 is one: compute the same exact
        # product through float32 instead (the bit patterns are pinned by tests/kernels).
        return (codecs.decode_e2m1(nib) * (sf.astype(jnp.float32) * jnp.float32(2.0**-126))).astype(jnp.bfloat16)
    return _expand_bits(w, hi, asm=cfg.dequant == "asm") * sf


def _kernel(xe_ref, xo_ref, w_ref, s_ref, o_ref, *, cfg: BlockConfig, steps: int, block: int, mx: bool, interpret: bool):
    bkh = cfg.bk // 2  # bytes of a weight row per step
    nsb = cfg.bk // block  # block scales per row per step
    n0 = pl.program_id(0) * cfg.bn
    m0 = pl.program_id(1) * cfg.bm
    split = pl.program_id(2)
    nt = (((1,), (1,)), ((), ()))

    def operands(i):
        """Step ``i``: expanded weight halves ``lo``, ``hi`` ``[bn, bk/2]`` bf16 and the matching
        even/odd activation columns ``[rows, bk/2]``."""
        kb = (split * steps + i) * bkh
        w = w_ref[pl.ds(n0, cfg.bn), pl.ds(kb, bkh)]
        s = s_ref[pl.ds(n0, cfg.bn), pl.ds((split * steps + i) * nsb, nsb)]
        sf = _scale_factor(s, cfg, mx)
        sf = jnp.broadcast_to(sf[:, :, None], (cfg.bn, nsb, block // 2)).reshape(cfg.bn, bkh)
        rows = cfg.bm if cfg.mma else 1
        xe = xe_ref[pl.ds(m0, rows), pl.ds(kb, bkh)]
        xo = xo_ref[pl.ds(m0, rows), pl.ds(kb, bkh)]
        return _expand(w, sf, False, cfg, interpret), _expand(w, sf, True, cfg, interpret), xe, xo

    if not cfg.mma:  # GEMV on the CUDA cores: elementwise float32 products, reduced once

        def gemv_step(i, acc):
            lo, hi, xe, xo = (a.astype(jnp.float32) for a in operands(i))
            return acc + lo * xe + hi * xo

        acc = jax.lax.fori_loop(0, steps, gemv_step, jnp.zeros((cfg.bn, bkh), jnp.float32))
        o_ref[split, pl.ds(m0, 1), pl.ds(n0, cfg.bn)] = jnp.sum(acc, axis=1)[None, :]
        return

    def step(i, acc):
        lo, hi, xe, xo = operands(i)
        if cfg.swap:
            acc = acc + jax.lax.dot_general(lo, xe, nt, preferred_element_type=jnp.float32)
            return acc + jax.lax.dot_general(hi, xo, nt, preferred_element_type=jnp.float32)
        acc = acc + jax.lax.dot_general(xe, lo, nt, preferred_element_type=jnp.float32)
        return acc + jax.lax.dot_general(xo, hi, nt, preferred_element_type=jnp.float32)

    run_k_loop(o_ref, step, cfg=cfg, steps=steps, n0=n0, m0=m0, split=split)


def run_k_loop(o_ref, step, *, cfg: BlockConfig, steps: int, n0, m0, split) -> None:
    """Run ``acc = step(i, acc)`` over the split's K steps from a float32 zero tile (``[bn, bm]``
    when ``cfg.swap``) and store it as the ``[bm, bn]`` / ``[bn, bm]`` tile of partials ``split``."""
    shape = (cfg.bn, cfg.bm) if cfg.swap else (cfg.bm, cfg.bn)
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(shape, jnp.float32))
    if cfg.swap:
        o_ref[split, pl.ds(n0, cfg.bn), pl.ds(m0, cfg.bm)] = acc
    else:
        o_ref[split, pl.ds(m0, cfg.bm), pl.ds(n0, cfg.bn)] = acc


@functools.partial(jax.jit, static_argnames=("cfg", "mx", "interpret"))
def fp4_matmul_partials(
    x: jax.Array, codes: jax.Array, scales: jax.Array, *, cfg: BlockConfig, mx: bool, interpret: bool = False
) -> jax.Array:
    """Split-K partial products ``[split_k, Mp, Np]`` float32 of ``x @ (Q*S).T * 2**-c``
    (``c`` = :func:`epilogue_exponent`; the layout is the same for ``swap=True``).

    Shapes must already be padded: ``x`` bf16 ``(Mp, K)`` with ``Mp % bm == 0``; ``codes`` uint8
    ``(Np, K/2)`` with ``Np % bn == 0``; ``K % (bk * split_k) == 0``; ``scales`` E4M3 ``(Np, K/16)``
    (``mx=False``) or uint8 E8M0 ``(Np, K/32)`` (``mx=True``).
    """
    if cfg.dequant not in DEQUANT_MODES:
        raise ValueError(f"unknown dequant mode {cfg.dequant!r}; expected one of {DEQUANT_MODES}")
    if not cfg.mma and (cfg.bm != 1 or cfg.swap):
        raise ValueError(f"mma=False is a one-row GEMV: needs bm=1 and swap=False, got {cfg}")
    mp, k = x.shape
    np_ = codes.shape[0]
    block = 32 if mx else 16
    steps = k // (cfg.bk * cfg.split_k)
    xe, xo = x[:, 0::2], x[:, 1::2]
    kernel = functools.partial(_kernel, cfg=cfg, steps=steps, block=block, mx=mx, interpret=interpret)
    grid = (np_ // cfg.bn, mp // cfg.bm, cfg.split_k)
    whole = lambda a: pl.BlockSpec(block_shape=a.shape, index_map=lambda i, j, s: (0,) * a.ndim)
    transposed = cfg.swap and cfg.mma
    out_shape = jax.ShapeDtypeStruct((cfg.split_k, np_, mp) if transposed else (cfg.split_k, mp, np_), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[whole(xe), whole(xo), whole(codes), whole(scales)],
        out_specs=pl.BlockSpec(block_shape=out_shape.shape, index_map=lambda i, j, s: (0, 0, 0)),
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )(xe, xo, codes, scales)
    return jnp.swapaxes(out, 1, 2) if transposed else out
