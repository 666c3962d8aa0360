"""FP4-weight x bf16-activation GEMM for Hopper, in Pallas lowered through Mosaic GPU (decode).

Computes ``P[s] = (Q * S)[:, Ks] @ X[:, Ks].T * 2**-c`` in float32 for each K split ``s`` (the
transposed product: weight rows are the wgmma M side, tokens the narrow N side), where ``Q`` are
the E2M1 weight values, ``S`` the per-block scales and ``c`` = 8 (E4M3) or 7 (E8M0); the caller
multiplies ``2**c`` back with the global multiplier, sums the splits and transposes.

How it streams weights at HBM speed on a GPU without FP4 tensor cores:

* TMA copies weight, scale and activation tiles into shared memory through a multi-stage
  pipeline (:func:`plgpu.emit_pipeline`); weights are read once, straight from HBM.
* Each warpgroup thread loads its packed bytes from shared memory in wgmma's 8-bit register
  layout (4 consecutive bytes = 8 consecutive K elements), expands them in registers to bf16 in
  wgmma's 16-bit A-operand layout and feeds ``wgmma`` with the weights as the register operand
  (the "RS" form): the expanded weights never touch shared memory.
* Expansion (inline PTX, per 32-bit word of 8 nibbles): ``(q & 0x80008000) | ((q & 0x70007000)
  >> 6)`` puts the top nibble of each 16-bit lane into a bf16 as ``e2m1 * 2**-126`` (sign to
  bit 15, the 3 magnitude bits to bits 6-8; E2M1's subnormal 0.5 lands on bf16's subnormal
  ``2**-127``); ``q << 4`` brings the next nibble pair up. One ``mul.rn.bf16x2`` by the block
  scale times ``2**(126 - c)`` gives ``e2m1 * scale * 2**-c`` exactly (at most 6 significant bits,
  in bf16's normal range for E4M3 scales and E8M0 exponents in ``[9, 135]``).
* So that this works, :func:`prepare_codes` permutes the nibbles inside each aligned 4-byte word
  (word nibble ``3 - j`` holds element ``2j``, nibble ``7 - j`` element ``2j + 1``), and the
  kernel's K order inside each 32-element chunk is the wgmma register order: column ``8j + 2p +
  e`` of the expanded tile is K offset ``8p + 2j + e`` (``p`` = the thread's lane in its quad).
  :func:`permute_activations` applies the same permutation to X's columns, so the product is
  unchanged. Each thread's 8 elements lie in one scale block (16 or 32 along K), so a thread
  needs one scale per row per chunk.
* Scales are stored transposed, ``(K / B, N)`` bytes, so that one block column of a tile is a
  contiguous row that loads straight into wgmma's row layout.

Layouts (:func:`prepare_codes`, :func:`prepare_scales`) are produced once, at load time, by pure
functions; the reference layout (PyTorch's ``(N, K/2)`` bytes, low nibble = even element) stays
what the rest of the library and the tests use.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, vector

SUB_K = 128  # K elements per wgmma call (one register tile of 64 x 128 bf16 per thread group)
CHUNK = 32  # K elements whose order is permuted together (one 16-byte row of a thread quad)
ROWS = 64  # weight rows per warpgroup (wgmma's M)
_ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector: each thread holds its rows r, r + 8


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """``bk`` K elements per pipeline step (a multiple of 128); ``split_k`` K partitions on the
    grid; ``stages`` TMA pipeline depth. Weight rows per CTA are fixed at 64 (one warpgroup)."""

    bk: int = 512
    split_k: int = 1
    stages: int = 4
    dequant: str = "ptx"  # "none": a lab diagnostic that skips the expansion math (wrong values)


def token_tile(m: int) -> int:
    """Rows of X the kernel computes for ``m`` tokens: a multiple of 8 (wgmma's N), at least 8."""
    return max(8, -(-m // 8) * 8)


def smem_bytes(mt: int, bk: int, stages: int) -> int:
    """Shared memory of the pipeline (upper bound: NVFP4's scale rows) plus the output tile."""
    return stages * (mt * bk * 2 + ROWS * bk // 2 + (bk // 16) * ROWS) + ROWS * mt * 4


def epilogue_exponent(mx: bool) -> int:
    return 7 if mx else 8


# ---------------------------------------------------------------------------------------------
# Layout transforms (pure; run once at load time)


def prepare_codes(codes: jax.Array) -> jax.Array:
    """PyTorch-order packed E2M1 bytes ``(N, K/2)`` -> the kernel's order (same shape and dtype).

    Inside each aligned 4-byte word (8 elements ``e0..e7``, ``e0`` in the low nibble of byte 0),
    nibble ``3 - j`` gets ``e_{2j}`` and nibble ``7 - j`` gets ``e_{2j+1}``."""
    n, kb = codes.shape
    if kb % 4:
        raise ValueError(f"packed codes need K/2 % 4 == 0 (K % 8 == 0), got {codes.shape}")
    c = codes.reshape(n, kb // 4, 4)
    e = jnp.stack([c & 0xF, c >> 4], axis=-1).reshape(n, kb // 4, 8)  # e[..., i] = element i
    order = np.array([6, 4, 2, 0, 7, 5, 3, 1])  # nibble position p holds element order[p]
    nib = e[..., order]
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.astype(jnp.uint8).reshape(n, kb)


def prepare_scales(scales: jax.Array) -> jax.Array:
    """Block scales ``(N, K/B)`` (E4M3 or E8M0 bytes) -> ``(K/B, N)`` uint8, same bytes."""
    return lax.bitcast_convert_type(scales, jnp.uint8).T if scales.dtype != jnp.uint8 else scales.T


def permute_activations(x: jax.Array) -> jax.Array:
    """Columns of ``x (M, K)`` in the kernel's K order: inside each 32-element chunk, column
    ``8j + 2p + e`` takes element ``8p + 2j + e``."""
    m, k = x.shape
    return x.reshape(m, k // CHUNK, 4, 4, 2).swapaxes(2, 3).reshape(m, k)


# ---------------------------------------------------------------------------------------------
# In-register expansion (Mosaic GPU inline)

# One nibble pair per output: top nibble of each 16-bit lane -> bf16 bits, times the multiplier;
# then ``q <<= 4`` brings up the next pair. ``$4`` = the word, ``$5`` = the bf16x2 multiplier.
_EXPAND_STEP = """and.b32 t, q, 0x70007000;
shr.b32 t, t, 6;
and.b32 u, q, 0x80008000;
or.b32 u, u, t;
mul.rn.bf16x2 ${j}, u, $5;
"""
_EXPAND_ASM = (
    "{\n.reg .b32 q, t, u;\nmov.b32 q, $4;\n" + "shl.b32 q, q, 4;\n".join(_EXPAND_STEP.format(j=j) for j in range(4)) + "}\n"
)

# Two E4M3 bytes (low: row r, high: row r + 8) -> two bf16x2 registers {s, s} * 2**118.
_E4M3_PAIR_ASM = """
{
.reg .b32 h;
.reg .b16 a, b;
.reg .f32 f, g;
cvt.rn.f16x2.e4m3x2 h, $2;
mov.b32 {a, b}, h;
cvt.f32.f16 f, a;
cvt.f32.f16 g, b;
mul.f32 f, f, 0f7A800000;
mul.f32 g, g, 0f7A800000;
cvt.rn.bf16x2.f32 $0, f, f;
cvt.rn.bf16x2.f32 $1, g, g;
}
"""


def _i32(v: int) -> ir.Value:
    return arith.constant(ir.IntegerType.get_signless(32), v)


def _scalar_i8(reg: ir.Value) -> ir.Value:
    """A WGMMA_ROW register (``vector<1xi8>``) -> its i8."""
    return vector.extract(reg, [], [0])


def _scale_pairs(s_lo: ir.Value, s_hi: ir.Value, mx: bool) -> tuple[ir.Value, ir.Value]:
    """Scale bytes of rows ``r`` and ``r + 8`` -> bf16x2 multipliers ``{s, s} * 2**(126 - c)``."""
    i32 = ir.IntegerType.get_signless(32)
    i16 = ir.IntegerType.get_signless(16)
    lo = arith.extui(i32, s_lo)
    hi = arith.extui(i32, s_hi)
    if mx:  # E8M0 byte e -> bf16 2**(e - 8): exponent field e + 119, both halves
        out = []
        for v in (lo, hi):
            f = arith.shli(arith.addi(v, _i32(119)), _i32(7))
            out.append(arith.ori(f, arith.shli(f, _i32(16))))
        return out[0], out[1]
    pair = arith.trunci(i16, arith.ori(lo, arith.shli(hi, _i32(8))))
    res = llvm.inline_asm(llvm.StructType.get_literal((i32, i32)), [pair], _E4M3_PAIR_ASM, "=r,=r,h")
    return llvm.extractvalue(i32, res, [0]), llvm.extractvalue(i32, res, [1])


def _expand_word(word: ir.Value, mult: ir.Value, math: bool = True) -> list[ir.Value]:
    """One 32-bit word of 8 permuted nibbles and a bf16x2 multiplier -> 4 bf16x2 registers
    (wgmma column tiles ``j = 0..3`` of this thread's quad lane)."""
    i32 = ir.IntegerType.get_signless(32)
    if not math:
        return [word, arith.xori(word, mult), arith.shli(word, _i32(4)), arith.shrui(word, _i32(4))]
    res = llvm.inline_asm(llvm.StructType.get_literal((i32,) * 4), [word, mult], _EXPAND_ASM, "=r,=r,=r,=r,r,r")
    return [llvm.extractvalue(i32, res, [j]) for j in range(4)]


def expand_tile(w: jax.Array, scale_rows: tuple[jax.Array, ...], *, mx: bool, math: bool = True) -> jax.Array:
    """Packed bytes ``[64, SUB_K/2]`` (WGMMA_8BIT layout) and the sub-tile's scale rows
    (``[64]`` uint8 each, WGMMA row layout; 8 for NVFP4, 4 for MXFP4) -> bf16 ``[64, SUB_K]`` in
    the WGMMA layout, K in the kernel's permuted order, times ``2**-c``."""
    rows, kb = w.shape
    nsb = len(scale_rows)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT, (_ROW_LAYOUT,) * nsb),
        return_type=plgpu.ShapeDtypeStruct((rows, 2 * kb), jnp.bfloat16, plgpu.Layout.WGMMA),
    )
    def expand(_, wf: mgpu.FragmentedArray, srows):
        i32 = ir.IntegerType.get_signless(32)
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
        out_layout = mgpu.WGMMA_LAYOUT
        out_shape = out_layout.registers_shape((rows, 2 * kb))
        wregs = wf.registers
        assert wregs.shape == (rows // 64, kb // 16, 1, 1, 2, 1, 1, 1, 1), wregs.shape
        assert out_shape == (rows // 64, kb // 4, 1, 1, 2, 1, 1, 1, 1), out_shape
        # NVFP4: lanes 0, 1 of a quad hold elements 0-15 of a 32-chunk, lanes 2, 3 elements 16-31.
        upper = None if mx else arith.cmpi(arith.CmpIPredicate.ne, arith.andi(mgpu.utils.thread_idx(), _i32(2)), _i32(0))
        out = np.empty(out_shape, dtype=object)
        for rt in range(rows // 64):
            for c in range(kb // 16):  # 32-element chunks
                if mx:
                    s_lo = _scalar_i8(srows[c].registers.flat[0])
                    s_hi = _scalar_i8(srows[c].registers.flat[1])
                else:
                    ev, od = srows[2 * c].registers.flat, srows[2 * c + 1].registers.flat
                    s_lo = arith.select(upper, _scalar_i8(od[0]), _scalar_i8(ev[0]))
                    s_hi = arith.select(upper, _scalar_i8(od[1]), _scalar_i8(ev[1]))
                mults = _scale_pairs(s_lo, s_hi, mx)
                for h in range(2):
                    word = mgpu.utils.bitcast(wregs[rt, c, 0, 0, h, 0, 0, 0, 0], i32)
                    for j, reg in enumerate(_expand_word(word, mults[h], math)):
                        out[rt, 4 * c + j, 0, 0, h, 0, 0, 0, 0] = mgpu.utils.bitcast(reg, bf16x2)
        return mgpu.FragmentedArray(_registers=out, _layout=out_layout, _is_signed=None)

    return expand(w, tuple(scale_rows))


# ---------------------------------------------------------------------------------------------
# The kernel


def _swizzled(dtype, minor_bytes: int) -> tuple:
    bits = jnp.dtype(dtype).itemsize * 8
    return (plgpu.TilingTransform((8, minor_bytes * 8 // bits)), plgpu.SwizzleTransform(minor_bytes))


@functools.partial(jax.jit, static_argnames=("cfg", "mx"))
def fp4_matmul_partials_mgpu(x: jax.Array, codes: jax.Array, scales_t: jax.Array, *, cfg: MgpuConfig, mx: bool) -> jax.Array:
    """Split-K partials ``[split_k, Np, Mt]`` float32 of ``(Q * S) @ X.T * 2**-c``.

    ``x`` bf16 ``(Mt, K)`` already in the kernel's column order (:func:`permute_activations`),
    ``Mt % 8 == 0``, ``Mt <= 256``; ``codes`` uint8 ``(Np, K/2)`` from :func:`prepare_codes`,
    ``Np % 64 == 0``; ``scales_t`` uint8 ``(K/B, Np)`` from :func:`prepare_scales`;
    ``K % (bk * split_k) == 0``."""
    mt, k = x.shape
    np_ = codes.shape[0]
    blk = 32 if mx else 16
    bk, split = cfg.bk, cfg.split_k
    if bk % SUB_K or k % (bk * split) or np_ % ROWS or mt % 8 or mt > 256:
        raise ValueError(f"bad shapes for the Mosaic GPU kernel: x {x.shape}, codes {codes.shape}, {cfg}")
    ks = k // split  # K per split
    steps = ks // bk
    nsub = bk // SUB_K
    sb_sub = SUB_K // blk  # scale rows per sub-tile

    def kernel(x_gmem, w_gmem, s_gmem, o_gmem, o_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")

        def with_acc(acc):
            def body(_, x_smem, w_smem, s_smem):
                for c in range(nsub):
                    wt = plgpu.load(w_smem.at[:, pl.ds(c * SUB_K // 2, SUB_K // 2)], (), layout=plgpu.Layout.WGMMA_8BIT)
                    srows = tuple(plgpu.load(s_smem.at[c * sb_sub + b], (), layout=_ROW_LAYOUT) for b in range(sb_sub))
                    a = expand_tile(wt, srows, mx=mx, math=cfg.dequant != "none")
                    plgpu.wgmma(acc, a, x_smem.at[:, pl.ds(c * SUB_K, SUB_K)].T)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                body,
                grid=(steps,),
                in_specs=[
                    plgpu.BlockSpec((mt, bk), lambda i: (0, i), transforms=_swizzled(jnp.bfloat16, 128)),
                    plgpu.BlockSpec((ROWS, bk // 2), lambda i: (0, i), transforms=_swizzled(jnp.uint8, 64)),
                    plgpu.BlockSpec((bk // blk, ROWS), lambda i: (i, 0)),
                ],
                max_concurrent_steps=cfg.stages,
            )(
                x_gmem.at[:, pl.ds(si * ks, ks)],
                w_gmem.at[pl.ds(ni * ROWS, ROWS), pl.ds(si * (ks // 2), ks // 2)],
                s_gmem.at[pl.ds(si * (ks // blk), ks // blk), pl.ds(ni * ROWS, ROWS)],
            )
            return acc[...]

        res = pl.run_scoped(with_acc, plgpu.ACC((ROWS, mt), jnp.float32))
        o_smem[...] = res
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * ROWS, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split, np_, mt), jnp.float32),
        grid=(np_ // ROWS, split),
        grid_names=("n", "s"),
        scratch_types=dict(o_smem=plgpu.SMEM((ROWS, mt), jnp.float32)),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    return f(x, codes, scales_t)
