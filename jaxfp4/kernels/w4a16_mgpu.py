"""FP4-weight x bf16-activation GEMM for Hopper, in Pallas lowered through Mosaic GPU (any M).

A unit of work is a 64-weight-row (128 in the warp-specialized form, ``MgpuConfig.wgs=2``) x
up-to-256-token tile of the transposed product ``(Q * S) @ X.T`` (weight rows are the wgmma M
side, tokens its N side) over one K split, where ``Q`` are the E2M1 weight values and ``S`` the
per-block scales, in float32. The grid is persistent: each CTA runs one TMA pipeline through its
share of the units, so there is one pipeline fill per CTA, not one per tile, and all CTAs can be
resident at once (``MgpuConfig.ctas``). A CTA is one warpgroup that issues the copies and
computes, or (``wgs=2``) a producer warpgroup and two consumer warpgroups that share each
activation tile (half the activation reads from L2 per weight byte, and one consumer's expansion
overlaps the other's wgmma; the form for M above ~64). Two outputs:

* :func:`fp4_matmul_fused_mgpu` (K not split): the epilogue runs in the kernel: times the row
  multipliers (global scale x ``2**c``), plus the bias if any, rounded to the output dtype and
  stored transposed, so the result is ``(M, N)`` like the reference;
* :func:`fp4_matmul_partials_mgpu` (split-K, for decode shapes with too few row tiles to fill
  the GPU): float32 partials ``[split, M, N]`` times ``2**-c`` (stored transposed like the fused
  output, so that one token's partials are contiguous rows); the caller sums them and
  applies the epilogue.

``c`` = 8 (E4M3 scales) or 7 (E8M0) keeps the expanded weights in bf16's normal range (below).

How it streams weights at HBM speed on a GPU without FP4 tensor cores:

* TMA copies weight, scale and activation tiles into shared memory through a multi-stage
  pipeline (:func:`plgpu.emit_pipeline`); weights are read once, straight from HBM.
* Each warpgroup thread loads its packed bytes from shared memory in wgmma's 8-bit register
  layout (4 consecutive bytes = 8 consecutive K elements), expands them in registers to bf16 in
  wgmma's 16-bit A-operand layout and feeds ``wgmma`` with the weights as the register operand
  (the "RS" form): the expanded weights never touch shared memory.
* Expansion (inline PTX, per 32-bit word of 8 E2M1 codes): a bf16 whose sign is the code's sign
  (bit 15 of a 16-bit lane) and whose bits 8, 7, 6 are the code's magnitude bits ``e1 e0 m`` is
  ``e2m1 * 2**-126`` (E2M1's subnormal 0.5 lands on bf16's subnormal ``2**-127``). One
  ``mul.rn.bf16x2`` by the block scale times ``2**(126 - c)`` gives ``e2m1 * scale * 2**-c``
  exactly (at most 6 significant bits, in bf16's normal range for E4M3 scales and E8M0 exponents
  in ``[9, 135]``). :func:`prepare_codes` scatters each code's 4 bits inside its word (not as a
  nibble) so that the four bf16x2 outputs of a word take 10 integer instructions in all, not 15:
  output 0 is ``q & 0x81C081C0``, outputs 1 and 2 are ``(q << 6)`` and ``(q << 3)`` masked the
  same way, output 3 gathers two right shifts in one ``mul.hi`` (:data:`BIT_PLACES`).
* So that this works with activations in their natural K order, quad lane ``p`` loads the 4
  bytes of each 16-byte row chunk (32 elements) that hold exactly the elements wgmma wants from
  it, ``8j + 2p + e`` (output ``j = 0..3``, 16-bit lane ``e = 0, 1``). NVFP4 words span two scale
  blocks (outputs ``j = 0, 1`` in the chunk's first 16 elements, ``j = 2, 3`` in the second), so a
  thread applies two multipliers per word; MXFP4 words lie in one block.
* Scales are stored transposed, ``(K / B, N)`` bytes, so that one block column of a tile is a
  contiguous row that loads straight into wgmma's row layout; NVFP4's E4M3 scales re-encoded so
  that one integer multiply-add makes each bf16 multiplier (:func:`prepare_scales`; zero,
  negative and NaN scales are carried by the codes and the row multipliers).

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
CHUNK = 32  # K elements laid out together (one 16-byte row chunk of a thread quad)
ROWS = 64  # weight rows per warpgroup (wgmma's M)
MAX_TOKENS = 256  # token rows per CTA at most (wgmma's widest N)
_ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector: each thread holds its rows r, r + 8


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """``bk`` K elements per pipeline step (a multiple of 128); ``split_k`` K partitions;
    ``stages`` TMA pipeline depth; ``ctas`` the persistent grid's size (see :func:`_build`);
    ``inflight`` wgmma groups left running across a pipeline step (0: each step waits for its
    products; 1: the step's last wgmma overlaps the next step's weight expansion, and the
    activation tile's buffer is released one step later; in the warp-specialized form every
    input of the step is). Weight rows per unit of work: :attr:`rows`. On the H100,
    ``inflight=1`` was slower in every case measured (M = 1: 4-26%, four Llama-3-8B layer shapes
    with their tuned configs; M = 128 and 4096 with two-stage configs: 1.6-1.8x; with ``wgs=2``
    at M = 128: 1.2-2x; ``kernels/results/tune-mgpu-*.json``), so the default waits;
    ``kernels/tune_mgpu.py --compare-inflight`` re-measures it."""

    bk: int = 512
    split_k: int = 1
    stages: int = 4
    # Lab diagnostics (wrong values; kernels/tune_mgpu.py --diagnose): "none" skips the expansion
    # math, "noscale" the scale loads and conversion, "skip" everything but the pipeline's copies.
    dequant: str = "ptx"
    ctas: int = 0  # CTAs of the persistent grid (0: one per unit of work, see _build)
    inflight: int = 0
    # Compute warpgroups per CTA: 1 (the CTA's one warpgroup issues the TMA pipeline and computes
    # 64 weight rows) or 2 (warp-specialized: a producer warpgroup issues the copies, two consumer
    # warpgroups compute 64 rows each of a 128-row tile and share its activation tile, which halves
    # the activation reads per weight byte; see :func:`_build`).
    wgs: int = 1
    # Split-K partials summed in the kernel (one-warpgroup form, ``split_k`` 2, 4 or 8): the
    # ``split_k`` CTAs of a unit form a thread block cluster, each leaves its float32 partial in
    # its shared memory, and rank 0 reads the others' through distributed shared memory, sums them
    # in rank order and runs the fused epilogue; no partials in HBM, no reduction kernel.
    cluster: bool = False

    @property
    def rows(self) -> int:
        """Weight rows per unit of work (``64 * wgs``)."""
        return ROWS * self.wgs


@dataclasses.dataclass(frozen=True)
class L2Prefetch:
    """What a kernel asks the L2 cache to fetch of another weight (the layer that runs next) once
    its CTAs are done with their own units: the first ``count`` (unit, K step) tiles of the next
    kernel's schedule, in the order its CTAs will first read them (time slot ``s = i // ctas``,
    CTA ``i % ctas``: step ``s % steps`` of unit ``i % ctas + (s // steps) * ctas``). The next
    kernel's schedule as :func:`_build` runs it: ``rows`` weight rows x ``bk`` K elements per tile,
    ``block`` the scale block (16 or 32), ``steps`` K steps per unit, ``row_tiles`` x
    ``token_tiles`` output tiles per K split, ``units`` units of work, ``ctas`` its grid.

    A hint: ``cp.async.bulk.prefetch.tensor`` per tile (codes and scale bytes), nothing waits on
    it and it changes no value. At decode the small kernels between two GEMMs (norms, attention,
    the split-K sums) leave HBM idle; the next GEMM then starts with its first tiles in L2.
    Made by :func:`jaxfp4.ops.pallas.l2_prefetch_plan`."""

    rows: int
    bk: int
    block: int
    steps: int
    row_tiles: int
    token_tiles: int
    units: int
    ctas: int
    count: int

    def place(self, i):
        """Item ``i``'s ``(unit, row tile, K step)`` (Python ints, or traced ones in the kernel);
        the unit may not exist (``>= units``)."""
        s, c2 = i // self.ctas, i % self.ctas
        u = c2 + (s // self.steps) * self.ctas
        return u, u % self.row_tiles, (u // (self.row_tiles * self.token_tiles)) * self.steps + s % self.steps

    def tile(self, i: int) -> tuple[int, int] | None:
        """Item ``i``'s (row tile, K step), or None where its unit does not exist (the last
        time slots of a grid whose CTAs have unequal shares)."""
        u, ni, kk = self.place(i)
        return None if u >= self.units else (ni, kk)


def token_tile(m: int) -> int:
    """Token rows per CTA for ``m`` tokens: ``m`` rounded up to a multiple of 8 (wgmma's N step),
    at least 8, at most 256 (wgmma's widest N)."""
    return min(MAX_TOKENS, max(8, -(-m // 8) * 8))


def input_rows(m: int) -> int:
    """Rows X must have for ``m`` tokens: ``m`` below 8, else ``m`` rounded up to a multiple of 8
    (Mosaic GPU's tiling); the TMA copies read the rows from there to :func:`padded_tokens` as zeros."""
    return m if m < 8 else -(-m // 8) * 8


def padded_tokens(m: int) -> int:
    """Rows of X the kernel computes for ``m`` tokens: a multiple of :func:`token_tile`."""
    mt = token_tile(m)
    return -(-m // mt) * mt


# Largest token tile the cluster reduction (MgpuConfig.cluster) is verified with. Session 19 saw
# 64-token tiles fail; the cause (session 20, kernels/probe_cluster_tile.py): Mosaic GPU on jax
# 0.11.2 could not compile the store of a (64, 64) float32 partial into plain shared memory ("Failed
# to synthesize a transfer pattern that avoids bank conflicts"). Partials whose rows are whole
# 128-byte lines are now stored swizzled, and tiles of 16 to 128 tokens (32, 40, 56, 64, 96, 128
# included) equal the one-split kernel there; larger tiles leave no room for it in shared memory.
CLUSTER_MAX_TILE = 128

SMEM_LIMIT = 227 * 1024  # shared memory one Hopper CTA may use (bytes)


def smem_bytes(mt: int, bk: int, stages: int, out_bytes: int = 4, block: int = 16, wgs: int = 1) -> int:
    """Shared memory of the pipeline (``block``: the scale block, 16 for NVFP4's scale rows, 32
    for MXFP4; the fused form's epilogue rows counted in every stage; ``wgs`` compute warpgroups
    of 64 weight rows each) and of the output tiles (``out_bytes`` per element, one per compute
    warpgroup)."""
    rows = ROWS * wgs
    return stages * (mt * bk * 2 + rows * bk // 2 + (bk // block) * rows + 2 * rows * 4) + rows * mt * out_bytes


def epilogue_exponent(mx: bool) -> int:
    return 7 if mx else 8


# ---------------------------------------------------------------------------------------------
# Layout transforms (pure; run once at load time)


# Where :func:`prepare_codes` puts the bits of output ``j``'s code in each 16-bit lane of a word
# (the lane's element ``8j + 2p + e`` at bit offset ``16 e``): positions of (sign, e1, e0, m).
# Output 0 has them where the bf16 wants them (15, 8, 7, 6); outputs 1 and 2 shifted down by 6
# and 3 as a whole; output 3 uses the four bits left: e1 e0 six above their place, m four above,
# the sign four below.
BIT_PLACES = ((15, 8, 7, 6), (9, 2, 1, 0), (12, 5, 4, 3), (11, 14, 13, 10))


def prepare_codes(codes: jax.Array) -> jax.Array:
    """PyTorch-order packed E2M1 bytes ``(N, K/2)`` (low nibble = even element) -> the kernel's
    words (same shape and dtype; ``K % 32 == 0``).

    Each 16-byte row chunk (32 elements) becomes four little-endian 32-bit words, word ``p`` (the
    one quad lane ``p`` loads) holding elements ``8j + 2p + e`` for ``j = 0..3``, ``e = 0, 1``:
    bit 3 (sign), 2, 1, 0 of element ``8j + 2p + e``'s code go to bits ``16 e + BIT_PLACES[j]``
    (:data:`BIT_PLACES`)."""
    n, kb = codes.shape
    if kb % 16:
        raise ValueError(f"packed codes need K/2 % 16 == 0 (K % 32 == 0), got {codes.shape}")
    c = codes.reshape(n, kb // 16, 16).astype(jnp.uint32)
    el = jnp.stack([c & 0xF, c >> 4], axis=-1).reshape(n, kb // 16, 4, 4, 2)  # [n, chunk, j, p, e]
    word = jnp.zeros((n, kb // 16, 4), jnp.uint32)  # [n, chunk, p]
    for j, places in enumerate(BIT_PLACES):
        for e in range(2):
            v = el[:, :, j, :, e]
            for bit, place in zip((3, 2, 1, 0), places, strict=True):
                word = word | (((v >> bit) & 1) << (16 * e + place))
    out = jnp.stack([(word >> (8 * b)) & 0xFF for b in range(4)], axis=-1)  # little-endian bytes
    return out.astype(jnp.uint8).reshape(n, kb)


# NVFP4 kernel scale byte of each E4M3 magnitude byte 0..7 (zero and the subnormals m * 2**-9);
# from 8 on (the normals) it is the magnitude byte + 16. See :func:`prepare_scales`.
_E4M3_LOW = np.array([0, 0, 8, 12, 16, 18, 20, 22], np.uint8)


def _scale_bytes(scales: jax.Array) -> jax.Array:
    """Block scales (E4M3 or E8M0) as their raw uint8 bytes."""
    return lax.bitcast_convert_type(scales, jnp.uint8) if scales.dtype != jnp.uint8 else scales


def prepare_scales(scales: jax.Array) -> jax.Array:
    """Block scales ``(N, K/B)`` -> the kernel's scale bytes, transposed: ``(K/B, N)`` uint8.

    MXFP4 (E8M0 bytes): the same bytes. NVFP4 (E4M3): the magnitude ``|s| = 2**E * (1 + f/8)``
    (``E`` in ``[-9, 8]``: subnormals normalized, ``f`` in ``0..7``) as the unsigned byte
    ``(E + 9) << 3 | f`` (0 to 142), so that the kernel makes its bf16 multiplier ``|s| * 2**118``
    with one integer multiply-add (byte ``* 16 + 0x7600``: the byte lands on bf16's exponent and
    top mantissa bits, ``E + 245 = (E + 9) + 236``) instead of float conversions. What this
    byte cannot say goes into the codes and row multipliers instead (:func:`fold_scale_signs`,
    :func:`nan_rows`): zero scales, negative scales, NaN."""
    b = _scale_bytes(scales)
    if scales.dtype == jnp.float8_e4m3fn:
        mag = b & 0x7F
        b = jnp.where(mag >= 8, mag + 16, jnp.asarray(_E4M3_LOW)[mag & 7])
        b = jnp.where(mag == 0x7F, 0, b).astype(jnp.uint8)  # NaN: see nan_rows
    return b.T


def fold_scale_signs(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """PyTorch-order codes ``(N, K/2)`` with what an NVFP4 kernel scale byte cannot carry moved
    into them, exactly: the codes of a block whose scale is zero become zero (the block's
    products are zero either way), those of a negative scale's block have their sign bits flipped
    (``q * -s = -q * s``). Other formats: unchanged."""
    if scales.dtype != jnp.float8_e4m3fn:
        return codes
    b = _scale_bytes(scales)
    n, kb = codes.shape
    per = codes.reshape(n, b.shape[1], kb // b.shape[1])
    zero, neg = ((b & 0x7F) == 0)[..., None], (b >= 0x80)[..., None]
    per = jnp.where(zero, jnp.uint8(0), jnp.where(neg, per ^ jnp.uint8(0x88), per))
    return per.reshape(n, kb)


def kernel_operands(codes: jax.Array, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PyTorch-order codes ``(N, K/2)`` and block scales ``(N, K/B)`` -> the kernel's codes and
    scale bytes (:func:`fold_scale_signs`, :func:`prepare_codes`, :func:`prepare_scales`); rows
    with a NaN scale (:func:`nan_rows`) are the caller's to mark in the row multipliers."""
    return prepare_codes(fold_scale_signs(codes, scales)), prepare_scales(scales)


def nan_rows(scales: jax.Array) -> jax.Array:
    """bool ``(N,)``: rows with a NaN block scale (E4M3 ``0x7F``/``0xFF``, E8M0 ``0xFF``), whose
    every product, so every output, is NaN: the kernel gets a NaN row multiplier for them."""
    b = _scale_bytes(scales)
    nan = (b & 0x7F) == 0x7F if scales.dtype == jnp.float8_e4m3fn else b == 0xFF
    return nan.any(axis=1)


# ---------------------------------------------------------------------------------------------
# In-register expansion (Mosaic GPU inline)

# The four bf16x2 outputs of a word (:data:`BIT_PLACES`), each times its multiplier. ``$4`` = the
# word, ``$5`` / ``$6`` = the bf16x2 multipliers of outputs 0, 1 / 2, 3 (the two NVFP4 blocks of a
# word; the same one for MXFP4). Output 3: ``x = q & 0x64006400`` keeps e1 e0 (6 above their
# place) and m (4 above); ``mul.hi`` by ``2**28 + 2**26`` is ``(x >> 4) + (x >> 6)`` (plus at most
# a carry into bit 0: the two shifted copies share no bit), which puts e1 e0 and m in place with
# copies elsewhere that the mask drops; the sign comes from ``q << 4``.
_EXPAND_ASM = """{
.reg .b32 q, x, h, s, u;
mov.b32 q, $4;
and.b32 u, q, 0x81C081C0;
mul.rn.bf16x2 $0, u, $5;
shl.b32 u, q, 6;
and.b32 u, u, 0x81C081C0;
mul.rn.bf16x2 $1, u, $5;
shl.b32 u, q, 3;
and.b32 u, u, 0x81C081C0;
mul.rn.bf16x2 $2, u, $6;
and.b32 x, q, 0x64006400;
mul.hi.u32 h, x, 0x14000000;
shl.b32 s, q, 4;
and.b32 s, s, 0x80008000;
and.b32 h, h, 0x01C001C0;
or.b32 u, h, s;
mul.rn.bf16x2 $3, u, $6;
}
"""


def _i32(v: int) -> ir.Value:
    return arith.constant(ir.IntegerType.get_signless(32), v)


def _scalar_i8(reg: ir.Value) -> ir.Value:
    """A WGMMA_ROW register (``vector<1xi8>``) -> its i8."""
    return vector.extract(reg, [], [0])


def _scale_pairs(s_lo: ir.Value, s_hi: ir.Value, mx: bool) -> tuple[ir.Value, ir.Value]:
    """Kernel scale bytes (:func:`prepare_scales`) of rows ``r`` and ``r + 8`` -> bf16x2
    multipliers ``{s, s} * 2**(126 - c)``, one integer multiply-add each: the byte times
    ``0x10001 << sh`` puts it at bit ``sh`` of both halves, plus the exponent offset. E8M0 byte
    ``e``: ``2**(e - 8)``, exponent field ``e + 119`` (``sh = 7``); NVFP4 byte ``(E + 9) << 3 | f``:
    ``2**(E + 118) * (1 + f/8)``, exponent field ``(E + 9) + 236`` and mantissa ``f << 4``
    (``sh = 4``)."""
    i32 = ir.IntegerType.get_signless(32)
    sh, off = (7, 119 << 7) if mx else (4, 236 << 7)
    return tuple(arith.addi(arith.muli(arith.extui(i32, v), _i32(0x10001 << sh)), _i32(off * 0x10001)) for v in (s_lo, s_hi))


def _expand_word(word: ir.Value, m01: ir.Value, m23: ir.Value, math: bool = True) -> list[ir.Value]:
    """One 32-bit word of 8 codes (:func:`prepare_codes`) and the bf16x2 multipliers of its outputs 0, 1 and
    2, 3 -> 4 bf16x2 registers (wgmma column tiles ``j = 0..3`` of this thread's quad lane)."""
    i32 = ir.IntegerType.get_signless(32)
    if not math:
        return [word, arith.xori(word, m01), arith.shli(word, _i32(4)), arith.xori(word, m23)]
    res = llvm.inline_asm(llvm.StructType.get_literal((i32,) * 4), [word, m01, m23], _EXPAND_ASM, "=r,=r,=r,=r,r,r,r")
    return [llvm.extractvalue(i32, res, [j]) for j in range(4)]


def expand_tile(w: jax.Array, scale_rows: tuple[jax.Array, ...], *, mx: bool, math: bool = True) -> jax.Array:
    """Packed bytes ``[64, SUB_K/2]`` (WGMMA_8BIT layout) and the sub-tile's scale rows
    (``[64]`` uint8 each, WGMMA row layout; 8 for NVFP4, 4 for MXFP4) -> bf16 ``[64, SUB_K]`` in
    the WGMMA layout, K in natural order, times ``2**-c``. (No scale rows: a lab diagnostic that
    multiplies by a constant instead.)"""
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
        out = np.empty(out_shape, dtype=object)
        for rt in range(rows // 64):
            for c in range(kb // 16):  # 32-element chunks
                if not nsb:
                    m01 = m23 = (_i32(0x7A807A80),) * 2
                elif mx:
                    m01 = m23 = _scale_pairs(*(_scalar_i8(r) for r in srows[c].registers.flat[:2]), mx)
                else:  # outputs 0, 1 in the chunk's first 16-block, 2, 3 in its second
                    m01 = _scale_pairs(*(_scalar_i8(r) for r in srows[2 * c].registers.flat[:2]), mx)
                    m23 = _scale_pairs(*(_scalar_i8(r) for r in srows[2 * c + 1].registers.flat[:2]), mx)
                for h in range(2):  # rows r, r + 8
                    word = mgpu.utils.bitcast(wregs[rt, c, 0, 0, h, 0, 0, 0, 0], i32)
                    for j, reg in enumerate(_expand_word(word, m01[h], m23[h], math)):
                        out[rt, 4 * c + j, 0, 0, h, 0, 0, 0, 0] = mgpu.utils.bitcast(reg, bf16x2)
        return mgpu.FragmentedArray(_registers=out, _layout=out_layout, _is_signed=None)

    return expand(w, tuple(scale_rows))


# ---------------------------------------------------------------------------------------------
# The kernel


def _swizzled(dtype, minor_bytes: int) -> tuple:
    bits = jnp.dtype(dtype).itemsize * 8
    return (plgpu.TilingTransform((8, minor_bytes * 8 // bits)), plgpu.SwizzleTransform(minor_bytes))


def _check(x: jax.Array, codes: jax.Array, cfg: MgpuConfig, out_bytes: int, mx: bool, prefetch=None) -> None:
    _check_prefetch(prefetch)
    if prefetch is not None and cfg.wgs != 1:
        raise ValueError(f"{cfg}: the L2 prefetch of the next layer needs the one-warpgroup form (wgs == 1)")
    m, k = x.shape
    np_ = codes.shape[0]
    if cfg.wgs not in (1, 2):
        raise ValueError(f"{cfg}: wgs must be 1 or 2")
    if cfg.bk % SUB_K or k % (cfg.bk * cfg.split_k) or np_ % cfg.rows or codes.shape[1] * 2 != k or input_rows(m) != m:
        raise ValueError(f"bad shapes for the Mosaic GPU kernel: x {x.shape}, codes {codes.shape}, {cfg}")
    if cfg.inflight not in (0, 1) or cfg.stages <= cfg.inflight:
        raise ValueError(f"{cfg}: inflight must be 0 or 1 and below stages")
    if cfg.cluster and (cfg.wgs != 1 or cfg.split_k not in (2, 4, 8) or cfg.ctas % cfg.split_k):
        raise ValueError(f"{cfg}: the cluster reduction needs wgs == 1, split_k 2, 4 or 8 and ctas a multiple of it")
    if cfg.cluster and token_tile(m) > CLUSTER_MAX_TILE:
        raise ValueError(f"{cfg}: cluster reduction is verified up to {CLUSTER_MAX_TILE}-token tiles, not {token_tile(m)}")
    need = smem_bytes(token_tile(m), cfg.bk, cfg.stages, out_bytes, 32 if mx else 16, cfg.wgs)
    need += ROWS * token_tile(m) * 4 if cfg.cluster else 0  # the partial each cluster rank leaves
    if need > SMEM_LIMIT:
        raise ValueError(
            f"{cfg} needs {need / 1024:.0f} KiB of shared memory for {m} tokens (at most {SMEM_LIMIT // 1024} KiB): "
            "fewer stages or a smaller bk"
        )


def work_units(m: int, np_: int, split_k: int, wgs: int = 1) -> int:
    """Output tiles (``64 * wgs`` weight rows x a token tile) times K splits: the units of work
    the grid's CTAs share."""
    return (np_ // (ROWS * wgs)) * (padded_tokens(m) // token_tile(m)) * split_k


def _check_prefetch(prefetch: tuple[L2Prefetch, jax.Array, jax.Array] | None) -> None:
    if prefetch is None:
        return
    plan, pcodes, pscales = prefetch
    k = plan.bk * plan.steps * (plan.units // (plan.row_tiles * plan.token_tiles))
    want = ((plan.row_tiles * plan.rows, k // 2), (k // plan.block, plan.row_tiles * plan.rows))
    if (
        (pcodes.shape, pscales.shape) != want
        or pcodes.dtype != jnp.uint8
        or pscales.dtype != jnp.uint8
        or plan.rows > 256
        or plan.bk // 2 > 256
        or plan.units % (plan.row_tiles * plan.token_tiles)
    ):
        raise ValueError(f"L2 prefetch {plan} does not fit codes {pcodes.shape} {pcodes.dtype}, scales {pscales.shape}")


def _build(x, codes, scales_t, epilogue, *, cfg: MgpuConfig, mx: bool, out_dtype, prefetch=None):
    """The kernel. ``epilogue`` (``(1, Np)`` or ``(2, Np)`` float32: row multipliers, then biases
    if any) or None (split-K partials). ``prefetch``: None or ``(plan, codes, scales)`` of the
    next layer's kernel layout, whose first tiles each CTA asks into L2 when its units are done,
    round robin (:class:`L2Prefetch`).

    Persistent: ``G = cfg.ctas`` CTAs (0: one per unit) share the ``U`` units of work (an
    ``R``-row x token tile x K split, ``R = cfg.rows``; unit ``u`` = ``(si * MT + mi) * NT +
    ni``, weight tiles fastest) round robin, CTA ``c`` taking ``c, c + G, ...``; one TMA pipeline
    runs through all of a CTA's units and K steps, so the next unit's loads overlap this unit's
    last steps and epilogue.

    ``cfg.wgs == 1``: the CTA is one warpgroup; :func:`plgpu.emit_pipeline` issues each step's
    copies from it, ahead of its compute by ``stages - 1`` steps. ``cfg.wgs == 2``: three
    warpgroups (:func:`plgpu.emit_pipeline_warp_specialized`): the last issues the copies and
    waits on the consumers' release of each stage, so that copies never wait behind an
    expansion; consumer ``g`` expands and multiplies rows ``64 g .. 64 g + 63`` of the stage's
    128-row weight tile against the stage's one activation tile, and stores its own output tile."""
    m, k = x.shape
    mp, mt = padded_tokens(m), token_tile(m)  # rows past m: the TMA copy fills them with zeros
    np_ = codes.shape[0]
    blk = 32 if mx else 16
    bk, split, wgs, rows = cfg.bk, cfg.split_k, cfg.wgs, cfg.rows
    steps = k // split // bk  # pipeline steps per unit
    nsub = bk // SUB_K
    sb_sub = SUB_K // blk  # scale rows per sub-tile
    fused = epilogue is not None
    biased = fused and epilogue.shape[0] == 2
    nt, mtiles = np_ // rows, mp // mt
    cl = cfg.cluster
    if cl:  # units of one K split; grid axis "c" counts clusters of split CTAs (axis "s": the K split)
        units = work_units(m, np_, 1, wgs)
        ctas = min(units, cfg.ctas // split) if cfg.ctas > 0 else units
    else:
        units = work_units(m, np_, split, wgs)
        ctas = min(units, cfg.ctas) if cfg.ctas > 0 else units

    def kernel(x_gmem, w_gmem, s_gmem, *refs, o_smem, **red):
        e_gmem, refs = (refs[0], refs[1:]) if fused else (None, refs)
        (pw_gmem, ps_gmem, o_gmem) = refs if prefetch is not None else (None, None, *refs)
        c = lax.axis_index("c")
        count = (units - c + ctas - 1) // ctas  # this CTA's units (>= 1)

        def unit(t):
            u = c + t * ctas
            si = lax.axis_index("s") if cl else u // (nt * mtiles)
            return u % nt, (u // nt) % mtiles, si  # ni, mi, si

        def kstep(t, j):
            return unit(t)[2] * steps + j

        def step(idx, x_smem, w_smem, s_smem, e_smem, acc, g):
            """One pipeline step of compute warpgroup ``g`` (rows ``64 g .. 64 g + 63`` of the stage's tile)."""
            t, j = idx
            rs = pl.ds(g * ROWS, ROWS) if wgs > 1 else slice(None)
            for sub in range(nsub if cfg.dequant != "skip" else 0):
                wt = plgpu.load(w_smem.at[rs, pl.ds(sub * SUB_K // 2, SUB_K // 2)], (), layout=plgpu.Layout.WGMMA_8BIT)
                srows = tuple(
                    plgpu.load(s_smem.at[sub * sb_sub + b, rs], (), layout=_ROW_LAYOUT)
                    for b in range(sb_sub if cfg.dequant != "noscale" else 0)
                )
                a = expand_tile(wt, srows, mx=mx, math=cfg.dequant != "none")
                plgpu.wgmma(acc, a, x_smem.at[:, pl.ds(sub * SUB_K, SUB_K)].T)
            plgpu.wgmma_wait(cfg.inflight)

            @pl.when(j == steps - 1)
            def _store():
                ni, mi, si = unit(t)
                if cfg.inflight:
                    plgpu.wgmma_wait(0)
                res = acc[...]
                acc[...] = plgpu.layout_cast(jnp.zeros((ROWS, mt), jnp.float32), plgpu.Layout.WGMMA)
                if cl:
                    reduce_and_store(res, ni, mi, si, e_smem)
                else:
                    store_tile(res, ni, mi, si, e_smem, g, rs)

        def store_tile(res, ni, mi, si, e_smem, g, rs):
            """Compute warpgroup ``g``'s float32 tile sums ``res`` of unit ``(ni, mi, si)`` to the
            output: with the epilogue (row multipliers ``rs`` of the stage's epilogue rows, bias,
            rounding) transposed into the ``(Mp, Np)`` output when fused, else as split ``si``'s
            partial tile."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last unit's store has read o_smem
            o = o_smem.at[g] if wgs > 1 else o_smem
            row0 = ni * rows + g * ROWS
            y = res
            if fused:
                mult = lax.broadcast_in_dim(plgpu.load(e_smem.at[0, rs], (), layout=_ROW_LAYOUT), (ROWS, mt), (0,))
                y = y * mult
                if biased:
                    bias = plgpu.load(e_smem.at[1, rs], (), layout=_ROW_LAYOUT)
                    y = y + lax.broadcast_in_dim(bias, (ROWS, mt), (0,))
                y = y.astype(out_dtype)
            # Stored transposed ([tokens, rows]): the output is (M, N) like the xla path's, and a
            # token's split-K partials are contiguous rows (what a consumer summing them reads).
            plgpu.transpose_ref(o, (1, 0))[...] = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()
            tile = (pl.ds(mi * mt, mt), pl.ds(row0, ROWS))
            plgpu.copy_smem_to_gmem(o, o_gmem.at[tile] if fused else o_gmem.at[(si, *tile)])

        def reduce_and_store(res, ni, mi, si, e_smem):
            """Cluster reduction (``cfg.cluster``): every rank leaves its partial in its ``r_smem``;
            after the cluster barrier rank 0 adds the others' (distributed shared memory, rank
            order) and stores the sum through the fused epilogue (:func:`store_tile`); a second
            barrier keeps each rank's ``r_smem`` (and the CTA itself) alive until rank 0 has read it."""
            r_smem, bar = red["r_smem"], red["bar"]
            r_smem[...] = res
            plgpu.commit_smem()  # every thread's part stored before this warpgroup arrives
            plgpu.barrier_arrive(bar)
            plgpu.barrier_wait(bar)

            @pl.when(lax.axis_index("s") == 0)
            def _():
                tot = res
                for r in range(1, split):
                    tot = tot + plgpu.load(plgpu.cluster_ref(r_smem, {"s": r}), (), layout=plgpu.Layout.WGMMA)
                store_tile(tot, ni, mi, si, e_smem, 0, slice(None))

            plgpu.barrier_arrive(bar)
            plgpu.barrier_wait(bar)

        x_swz, w_swz = _swizzled(jnp.bfloat16, 128), _swizzled(jnp.uint8, 64)
        # The activation tile is read by wgmma from shared memory: released once no wgmma of its
        # step can be running. (The warp-specialized pipeline releases all of a step's inputs at
        # once, so there they are all held as long.)
        late = cfg.inflight if wgs > 1 else 0
        specs = [
            plgpu.BlockSpec((mt, bk), lambda t, j: (unit(t)[1], kstep(t, j)), transforms=x_swz, delay_release=cfg.inflight),
            plgpu.BlockSpec((rows, bk // 2), lambda t, j: (unit(t)[0], kstep(t, j)), transforms=w_swz, delay_release=late),
            plgpu.BlockSpec((bk // blk, rows), lambda t, j: (kstep(t, j), unit(t)[0]), delay_release=late),
        ]
        if fused:  # the unit's row multipliers (and biases), read at its last step
            specs.append(plgpu.BlockSpec((epilogue.shape[0], rows), lambda t, j: (0, unit(t)[0]), delay_release=late))
        gmem = (x_gmem, w_gmem, s_gmem, *((e_gmem,) if fused else ()))
        acc_spec = plgpu.ACC((ROWS, mt), jnp.float32)  # zero-initialized

        if wgs == 1:

            def with_acc(acc):
                def body(idx, x_smem, w_smem, s_smem, *e_smem):
                    step(idx, x_smem, w_smem, s_smem, e_smem[0] if fused else None, acc, 0)

                plgpu.emit_pipeline(body, grid=(count, steps), in_specs=specs, max_concurrent_steps=cfg.stages)(*gmem)

            pl.run_scoped(with_acc, acc_spec)
        else:

            def body(idx, x_smem, w_smem, s_smem, *rest):
                *e_smem, acc = rest
                step(idx, x_smem, w_smem, s_smem, e_smem[0] if fused else None, acc, lax.axis_index("wg"))
                return acc

            def compute(run):  # each consumer's accumulator lives across all its units
                def with_acc(acc):
                    run(acc)

                pl.run_scoped(with_acc, acc_spec)

            plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(count, steps),
                memory_registers=40,
                in_specs=specs,
                wg_axis="wg",
                num_compute_wgs=wgs,
                max_concurrent_steps=cfg.stages,
                compute_context=compute,
            )(*gmem)
        if prefetch is not None:  # each CTA of a cluster takes its own share
            prefetch_tiles(prefetch[0], pw_gmem, ps_gmem, c * split + lax.axis_index("s") if cl else c)
        plgpu.wait_smem_to_gmem(0)

    def prefetch_tiles(plan: L2Prefetch, pw_gmem, ps_gmem, c):
        """CTA ``c``'s share of ``plan``'s tiles: items ``c, c + ctas, ...`` (:meth:`L2Prefetch.tile`)."""

        grid = ctas * split if cl else ctas

        def issue(r, carry):
            i = c + r * grid
            u, ni, kk = plan.place(i)

            @pl.when((i < plan.count) & (u < plan.units))
            def _():
                row0 = ni * plan.rows
                plgpu.async_prefetch(pw_gmem.at[pl.ds(row0, plan.rows), pl.ds(kk * (plan.bk // 2), plan.bk // 2)])
                nb = plan.bk // plan.block
                plgpu.async_prefetch(ps_gmem.at[pl.ds(kk * nb, nb), pl.ds(row0, plan.rows)])

            return carry

        lax.fori_loop(0, -(-plan.count // grid), issue, 0)

    o_dtype = out_dtype if fused else jnp.float32
    out_type = jax.ShapeDtypeStruct((mp, np_) if fused else (split, mp, np_), o_dtype)
    o_shape, o_tf = (mt, ROWS), _swizzled(o_dtype, 128)
    args = (x, codes, scales_t, epilogue) if fused else (x, codes, scales_t)
    if prefetch is not None:
        args = (*args, *prefetch[1:])
    o_smem = plgpu.SMEM(((wgs,) if wgs > 1 else ()) + o_shape, o_dtype, transforms=o_tf)
    threads = dict(num_threads=wgs + 1, thread_name="wg") if wgs > 1 else {}
    scratch = dict(o_smem=o_smem)
    if cl:
        threads.update(cluster=(split,), cluster_names=("s",))
        # The partial each rank leaves: swizzled where its rows are whole 128-byte lines (Mosaic GPU
        # found no conflict-free store of the plain (64, 64) float32 tile on jax 0.11.2).
        r_tf = _swizzled(jnp.float32, 128) if mt % 32 == 0 else ()
        scratch.update(
            r_smem=plgpu.SMEM((ROWS, mt), jnp.float32, transforms=r_tf),
            bar=plgpu.ClusterBarrier(collective_axes=("s",), num_arrivals=1),
        )
    f = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(ctas,),
        grid_names=("c",),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **threads,
    )
    return f(*args)


def _prefetch_operands(prefetch, plan: L2Prefetch | None):
    if (prefetch is None) != (plan is None):
        raise ValueError("prefetch (the next layer's codes and scales) and prefetch_plan come together")
    return None if plan is None else (plan, *prefetch)


@functools.partial(jax.jit, static_argnames=("cfg", "mx", "prefetch_plan"))
def fp4_matmul_partials_mgpu(
    x: jax.Array,
    codes: jax.Array,
    scales_t: jax.Array,
    prefetch: tuple[jax.Array, jax.Array] | None = None,
    *,
    cfg: MgpuConfig,
    mx: bool,
    prefetch_plan: L2Prefetch | None = None,
) -> jax.Array:
    """Split-K partials ``[split_k, Mp, Np]`` float32 of ``X @ (Q * S).T * 2**-c`` (the caller sums
    them and multiplies ``2**c`` back); ``Mp = padded_tokens(M)``; token ``m``'s partials of
    split ``s`` are the contiguous row ``[s, m, :]``.

    ``x`` bf16 ``(M, K)`` (natural K order; ``M == input_rows(M)``: rows up to
    :func:`padded_tokens` are read as zeros by the TMA copies); ``codes`` uint8
    ``(Np, K/2)`` from :func:`prepare_codes`, ``Np % 64 == 0``; ``scales_t`` uint8 ``(K/B, Np)``
    from :func:`prepare_scales`; ``K % (bk * split_k) == 0``. ``prefetch``: the next layer's
    kernel codes and scales, of which the tiles ``prefetch_plan`` names are asked into L2 as the
    CTAs finish (:class:`L2Prefetch`; one-warpgroup configs only); no effect on the result."""
    pf = _prefetch_operands(prefetch, prefetch_plan)
    if cfg.cluster:
        raise ValueError(f"{cfg}: the cluster reduction writes the fused output (fp4_matmul_fused_mgpu)")
    _check(x, codes, cfg, 4, mx, pf)
    return _build(x, codes, scales_t, None, cfg=cfg, mx=mx, out_dtype=jnp.float32, prefetch=pf)


def row_multipliers(alpha: jax.Array, mx: bool) -> jax.Array:
    """float32 ``alpha * 2**c``: what the kernel's sums (``2**-c`` times the product) are
    multiplied by for row multipliers ``alpha`` (a layout's ``row_scale``)."""
    return alpha.astype(jnp.float32) * jnp.float32(2.0 ** epilogue_exponent(mx))


def epilogue_rows(row_scale: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The fused kernel's ``epilogue`` input: float32 ``[row_scale]`` or ``[row_scale, bias]``
    (each ``(Np,)``; ``row_scale`` from :func:`row_multipliers`)."""
    if bias is None:
        return row_scale[None]
    return jnp.stack([row_scale, bias.astype(jnp.float32)])


@functools.partial(jax.jit, static_argnames=("cfg", "mx", "out_dtype", "prefetch_plan"))
def fp4_matmul_fused_mgpu(
    x: jax.Array,
    codes: jax.Array,
    scales_t: jax.Array,
    epilogue: jax.Array,
    prefetch: tuple[jax.Array, jax.Array] | None = None,
    *,
    cfg: MgpuConfig,
    mx: bool,
    out_dtype: jnp.dtype = jnp.bfloat16,
    prefetch_plan: L2Prefetch | None = None,
) -> jax.Array:
    """``y = (X @ (Q * S).T) * alpha + bias`` ``(Mp, Np)`` in ``out_dtype`` (``Mp = padded_tokens(M)``)
    with the epilogue in the kernel (one K split: ``cfg.split_k == 1``): the float32 sum (which is
    ``2**-c`` times the product) times ``epilogue[0] = alpha * 2**c`` (the same as the sum times
    ``2**c`` times ``alpha``: a power of two), plus ``epilogue[1] = bias`` when there is a second
    row (the compiler may contract the two into one FMA, rounding once), rounded to
    ``out_dtype``. ``epilogue``: float32 ``(1, Np)`` or ``(2, Np)``, see :func:`epilogue_rows`
    (:func:`jaxfp4.ops.prepare_weights` stores row 0 as the layout's ``row_scale``); other
    arguments as :func:`fp4_matmul_partials_mgpu`."""
    pf = _prefetch_operands(prefetch, prefetch_plan)
    _check(x, codes, cfg, jnp.dtype(out_dtype).itemsize, mx, pf)
    if cfg.split_k != 1 and not cfg.cluster:
        raise ValueError(f"the fused epilogue needs split_k == 1 or the cluster reduction, got {cfg}")
    if epilogue.dtype != jnp.float32 or epilogue.shape not in ((1, codes.shape[0]), (2, codes.shape[0])):
        raise ValueError(f"epilogue must be float32 (1 or 2, {codes.shape[0]}), got {epilogue.dtype}{epilogue.shape}")
    return _build(x, codes, scales_t, epilogue, cfg=cfg, mx=mx, out_dtype=jnp.dtype(out_dtype), prefetch=pf)
