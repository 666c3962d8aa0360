"""The Mosaic GPU decode kernel (jaxfp4/kernels/w4a16_mgpu.py) and ``prepare_weights``.

On CPU (CI): the kernel's register-level expansion is emulated in numpy from its documented
layout (which bytes a thread loads, the PTX bit operations, which wgmma column each result
feeds) and must reproduce the dequantized weight exactly (``array_equal``) in natural K order,
so the activations need no re-ordering; the kernel lowers for CUDA on
the CPU-only install (jax 0.10). On a GPU: the kernel against the exact float64 product and
``fp4_linear`` against the "xla" reference (tolerances: tests/kernels/test_w4a16.py's docstring).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, MXFP4W4A16, NVFP4W4A4, NVFP4W4A16, FP4Format, GlobalScale, QuantizedTensor
from jaxfp4.kernels import w4a16_mgpu as K
from jaxfp4.ops import pallas
from tests.conftest import requires_gpu
from tests.kernels.test_w4a16 import _check_against_reference, _params

RECIPES = [NVFP4W4A16(), NVFP4W4A4(), MXFP4W4A16(), MXFP4W4A8()]


# Every E4M3 byte but the two NaNs: zero, subnormals, negative scales (folded into the codes).
E4M3_BYTES = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)


def _weight(seed: int, n: int, k: int, fmt: FP4Format) -> QuantizedTensor:
    """Random codes (every nibble) and scales over the kernel's exact range (every E4M3 byte but
    NaN, each at least once where there are 254 blocks; E8M0 exponents 9..135)."""
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
    if fmt is FP4Format.NVFP4:
        b = np.resize(rng.permutation(E4M3_BYTES), n * k // 16).reshape(n, k // 16)
        s = jnp.asarray(b).view(jnp.float8_e4m3fn)
        return QuantizedTensor(codes, s, jnp.ones((1,), jnp.float32), fmt, (n, k), (n,), GlobalScale.MULTIPLIER)
    s = jnp.asarray(rng.integers(9, 136, (n, k // 32), dtype=np.uint8))
    return QuantizedTensor(codes, s, None, fmt, (n, k), (n,), GlobalScale.NONE)


def _bf16(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)


def _expand_bits(q: np.ndarray) -> list[np.ndarray]:
    """The integer part of the kernel's PTX (``_EXPAND_ASM``), step by step on uint32 words:
    the bf16x2 bits of outputs 0..3 before their multiply."""
    u32 = np.uint32
    mask = u32(0x81C081C0)
    x = q & u32(0x64006400)
    h = ((x.astype(np.uint64) * np.uint64(0x14000000)) >> np.uint64(32)).astype(np.uint32)  # mul.hi.u32
    s = (q << u32(4)) & u32(0x80008000)
    return [q & mask, (q << u32(6)) & mask, (q << u32(3)) & mask, (h & u32(0x01C001C0)) | s]


def _lane_words(codes_p: np.ndarray) -> np.ndarray:
    """Kernel-layout code bytes ``(N, K/2)`` -> uint32 ``[N, chunk, p]``: the little-endian word
    that quad lane ``p`` loads from bytes ``4p..4p+3`` of each 16-byte row chunk."""
    b = codes_p.reshape(codes_p.shape[0], -1, 4, 4).astype(np.uint32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _emulate_expansion(codes_p: np.ndarray, scales_t: np.ndarray, mx: bool) -> np.ndarray:
    """The expanded bf16 tile ``A`` (float64, ``(N, K)``) that the kernel feeds wgmma, times
    ``2**c``: thread lane ``p`` of a quad loads bytes ``4p..4p+3`` of each 16-byte row chunk as one
    little-endian word; output ``j`` of the PTX (:func:`_expand_bits`) times the bf16 multiplier of
    its column's block goes to columns ``8j + 2p + {0, 1}``."""
    n, kb = codes_p.shape
    words = _lane_words(codes_p)  # [n, chunk, p]
    s = scales_t.T  # [n, K/B]
    chunks = np.arange(kb // 16)
    # The multiplier: one bf16 {s, s} per byte, the integer multiply-add of _scale_pairs (low half).
    sh, off = (7, 119 << 7) if mx else (4, 236 << 7)
    mult = _bf16((s.astype(np.uint32) << sh) + off)  # [n, K/B]
    if mx:
        mult = mult[:, chunks][..., None].repeat(4, -1)  # [n, chunk, j]
    else:
        mult = mult[:, 2 * chunks[:, None] + (np.arange(4)[None, :] >= 2)]  # outputs 2, 3: the second block
    a = np.zeros((n, kb // 16, 4, 4, 2))  # [n, chunk, j, p, e]
    for j, bits in enumerate(_expand_bits(words)):
        a[:, :, j, :, 0] = _bf16(bits & 0xFFFF) * mult[:, :, j, None]
        a[:, :, j, :, 1] = _bf16(bits >> 16) * mult[:, :, j, None]
    c = K.epilogue_exponent(mx)
    return a.reshape(n, kb * 2) * 2.0**c


@pytest.mark.parametrize("fmt", [FP4Format.NVFP4, FP4Format.MXFP4])
def test_register_expansion_reproduces_the_weight_in_natural_order(fmt):
    n, k = 48, 256
    q = _weight(0, n, k, fmt)
    mx = fmt is FP4Format.MXFP4
    a = _emulate_expansion(*(np.asarray(v) for v in K.kernel_operands(q.codes, q.scales)), mx)
    w = np.asarray(jaxfp4.dequantize(q, dtype=jnp.float32), np.float64)
    assert np.array_equal(a, w)  # every product exact, every element in its place


def test_prepare_codes_places_each_codes_bits_where_the_module_says():
    c = np.random.default_rng(2).integers(0, 256, (5, 64), dtype=np.uint8)
    p = np.asarray(K.prepare_codes(jnp.asarray(c)))
    words = _lane_words(p)  # [n, chunk, lane p]
    natural = np.stack([c & 0xF, c >> 4], -1).reshape(5, -1, 32)  # [n, chunk, element]
    # every bit of every word is one bit of one code (a bit permutation inside each chunk)
    assert np.array_equal(np.unpackbits(natural.astype(np.uint8)).sum(), np.unpackbits(p).sum())
    for p_ in range(4):
        for j, places in enumerate(K.BIT_PLACES):
            for e in range(2):
                code = np.zeros_like(words[:, :, p_])
                for bit, place in zip((3, 2, 1, 0), places, strict=True):
                    code |= ((words[:, :, p_] >> (16 * e + place)) & 1) << bit
                assert np.array_equal(code, natural[:, :, 8 * j + 2 * p_ + e])
    assert sorted(b for places in K.BIT_PLACES for b in places) == list(range(16))


def test_expansion_bits_are_the_bf16_of_every_code_pair():
    # every pair of codes (lane 0, lane 1) in every output position, through the PTX's integer steps
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    lo, hi = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    lo, hi = lo.ravel().astype(np.uint32), hi.ravel().astype(np.uint32)
    for j, places in enumerate(K.BIT_PLACES):
        rest = np.random.default_rng(j).integers(0, 2**32, lo.shape, dtype=np.uint32)  # the other outputs' bits
        q = rest
        for e, v in enumerate((lo, hi)):
            for bit, place in zip((3, 2, 1, 0), places, strict=True):
                pos = np.uint32(16 * e + place)
                q = (q & ~(np.uint32(1) << pos)) | (((v >> np.uint32(bit)) & np.uint32(1)) << pos)
        bits = _expand_bits(q)[j]
        for e, v in enumerate((lo, hi)):
            got = _bf16((bits >> np.uint32(16 * e)) & np.uint32(0xFFFF)) * 2.0**126
            assert np.array_equal(got, e2m1[v]) and np.array_equal(np.signbit(got), np.signbit(e2m1[v]))


def test_nvfp4_kernel_scale_bytes_decode_to_every_e4m3_magnitude():
    """All 256 E4M3 bytes: the kernel's byte (E4M3 magnitude re-encoded) times 16 plus 0x7600 is
    the bf16 bits of ``|s| * 2**118`` exactly, subnormals included; NaN bytes go to 0 (their rows
    get a NaN multiplier instead)."""
    b = np.arange(256, dtype=np.uint8)
    kb = np.asarray(K.prepare_scales(jnp.asarray(b[None]).view(jnp.float8_e4m3fn)))[:, 0]
    nan = (b & 0x7F) == 0x7F
    assert kb.max() <= 142 and not kb[nan].any()
    got = _bf16((kb.astype(np.uint32) << 4) + (236 << 7))
    want = np.abs(b.view(ml_dtypes.float8_e4m3fn).astype(np.float64)) * 2.0**118
    zero = (b & 0x7F) == 0
    assert np.array_equal(got[~nan & ~zero], want[~nan & ~zero])
    mx = np.arange(9, 136, dtype=np.uint8)  # E8M0: the bytes themselves
    assert np.array_equal(np.asarray(K.prepare_scales(jnp.asarray(mx[None])))[:, 0], mx)


def test_scale_signs_zeros_and_nans_move_into_codes_and_row_multipliers():
    """A zero scale's block gets zero codes, a negative scale's block sign-flipped codes (so the
    kernel's unsigned scale bytes give the same products); a NaN scale makes its row's
    multiplier NaN (every product of the row, so every output, is NaN in the reference); other
    blocks and MXFP4 codes are untouched."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (3, 32), dtype=np.uint8)  # 3 rows x 4 blocks of 16
    sb = np.array([[0x38, 0x00, 0xB8, 0x80], [0x01, 0x81, 0x7F, 0x38], [0x38] * 4], np.uint8)
    folded = np.asarray(K.fold_scale_signs(jnp.asarray(codes), jnp.asarray(sb).view(jnp.float8_e4m3fn)))
    blocks, fb = codes.reshape(3, 4, 8), folded.reshape(3, 4, 8)
    zero, neg = (sb & 0x7F) == 0, (sb >= 0x80) & ((sb & 0x7F) != 0)
    assert not fb[zero].any() and np.array_equal(fb[neg], blocks[neg] ^ 0x88)
    assert np.array_equal(fb[~zero & ~neg], blocks[~zero & ~neg])
    q = QuantizedTensor(
        jnp.asarray(codes), jnp.asarray(sb).view(jnp.float8_e4m3fn), jnp.ones((1,), jnp.float32),
        FP4Format.NVFP4, (3, 64), (3,), GlobalScale.MULTIPLIER,
    )  # fmt: skip
    assert np.array_equal(np.asarray(K.nan_rows(q.scales)), [False, True, False])
    rs = np.asarray(jaxfp4.prepare_weights(jaxfp4.make_params(q, NVFP4W4A16())).kernel_layout.row_scale)
    assert np.isnan(rs[1]) and np.isfinite(np.delete(rs, 1)).all()
    e8 = jnp.asarray(rng.integers(0, 255, (3, 2), dtype=np.uint8))
    assert np.array_equal(np.asarray(K.fold_scale_signs(jnp.asarray(codes), e8)), codes)
    assert np.array_equal(np.asarray(K.nan_rows(e8.at[2, 1].set(0xFF))), [False, False, True])


def test_prepare_weights_is_pure_and_pads():
    p = _params(NVFP4W4A16(), 100, 160)
    before = np.asarray(p.weight.codes).copy()
    q = jaxfp4.prepare_weights(p)
    assert p.kernel_layout is None and np.array_equal(np.asarray(p.weight.codes), before)
    kl = q.kernel_layout
    assert (kl.n, kl.k) == (100, 160) and kl.codes.shape == (128, 128) and kl.scales.shape == (256 // 16, 128)
    assert q.weight is p.weight  # the reference layout is kept as is
    x = jax.random.normal(jax.random.key(0), (3, 160), jnp.bfloat16)
    assert np.array_equal(jaxfp4.fp4_linear(x, q, backend="xla"), jaxfp4.fp4_linear(x, p, backend="xla"))
    leaves = jax.tree.leaves(jax.jit(lambda t: t)(q))  # a pytree through jit
    assert len(leaves) == len(jax.tree.leaves(p)) + 3  # codes, scales, row_scale
    with pytest.raises(ValueError, match="kernel_layout"):
        dataclasses.replace(q, kernel_layout=dataclasses.replace(kl, n=99)).validate()
    odd = _params(MXFP4W4A16(), 64, 32)  # K = 32: still one chunk, padded to 128
    assert jaxfp4.prepare_weights(odd).kernel_layout.codes.shape == (64, 64)


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
def test_layout_row_scale_is_the_kernels_epilogue_multiplier(recipe):
    """The layout's ``row_scale``: per weight row, the global multiplier of the row's partition
    (NVFP4: fused halves with their own global scales; MXFP4: 1) times ``2**c``, times the static
    activation scale for W4A8 (whose kernels take the FP8 codes' values); 0 on padded rows."""
    p = _params(recipe, 100, 256, fused=True)
    if p.weight.format is FP4Format.NVFP4:  # two halves with global scales of their own
        p = dataclasses.replace(p, weight=dataclasses.replace(p.weight, global_scale=jnp.array([3312.0, 1000.0])))
    kl = jaxfp4.prepare_weights(p).kernel_layout
    rs = np.asarray(kl.row_scale, np.float64)
    assert kl.row_scale.dtype == jnp.float32 and rs.shape == (128,) and not rs[100:].any()
    w = p.weight
    if w.format is FP4Format.NVFP4:
        g = np.asarray(w.global_scale, np.float64)  # compressed-tensors divisors
        mult = np.repeat(np.asarray(1.0 / g, np.float32), 50)  # the multiplier form, rounded to float32
    else:
        mult = np.ones(100)
    if isinstance(recipe, MXFP4W4A8):
        mult = mult * float(p.input_scale)
    assert np.array_equal(rs[:100], mult * 2.0 ** K.epilogue_exponent(w.format is FP4Format.MXFP4))


@pytest.mark.parametrize("fmt", [FP4Format.NVFP4, FP4Format.MXFP4])
@pytest.mark.parametrize("m", [1, 5, 16, 40, 128, 300, 4096])
@pytest.mark.parametrize(("n", "k"), [(64, 512), (6144, 4096), (28672, 4096), (4096, 14336), (1000, 160 + 96)])
def test_heuristic_mgpu_config_is_valid(fmt, m, n, k):
    """Untuned shapes: the config divides K, fits in shared memory, and its grid gives every
    CTA at least one unit of work with no more CTAs than 3 per SM (one wave; warp-specialized:
    one per SM), which it picks from ``WS_MIN_M`` tokens where N allows 128-row tiles."""
    np_, kp = -(-n // K.ROWS) * K.ROWS, -(-k // K.SUB_K) * K.SUB_K
    with pallas.tuned_override([]):
        cfg = pallas.choose_mgpu_config(m, np_, kp, fmt)
    blk = fmt.block_size
    assert kp % (cfg.bk * cfg.split_k) == 0 and cfg.bk % K.SUB_K == 0 and np_ % cfg.rows == 0
    smem = K.smem_bytes(K.token_tile(m), cfg.bk, cfg.stages, 2 if cfg.split_k == 1 else 4, blk, cfg.wgs)
    assert smem <= K.SMEM_LIMIT
    units = K.work_units(m, np_, cfg.split_k, cfg.wgs)
    assert 1 <= cfg.ctas <= min(units, (3 if cfg.wgs == 1 else 1) * pallas.sm_count())
    if cfg.wgs == 2:
        assert m >= pallas.WS_MIN_M and np_ % 128 == 0 and units >= pallas.WS_MIN_UNITS * pallas.sm_count()
    else:
        assert m < pallas.WS_MIN_M or np_ % 128 or pallas._ws_config(m, np_, kp, 2, pallas.sm_count(), fmt) is None


@pytest.mark.parametrize(
    ("m", "k", "n", "wgs"),
    [
        (1, 4096, 14336, 1),  # decode: one-warpgroup CTAs
        (128, 4096, 14336, 2),
        (128, 14336, 4096, 2),  # split-K brings 32 row tiles to 128 units
        (256, 4096, 14336, 2),
        (256, 14336, 4096, 1),  # 256-token tiles: no room for split-K partials, 32 units
        (256, 8192, 8192, 1),
        (1024, 8192, 8192, 2),
    ],
)
def test_heuristic_picks_the_measured_kernel_form(m, k, n, wgs):
    """The heuristic's form where both were measured on the H100 (pallas.WS_MIN_M's comment)."""
    with pallas.tuned_override([]):
        assert pallas.choose_mgpu_config(m, n, k).wgs == wgs


def test_tuned_mgpu_records_are_found_and_kept_from_the_triton_kernel():
    from jaxfp4.kernels.w4a16_triton import BlockConfig

    cfg = K.MgpuConfig(256, 2, 5, ctas=7)
    rec = {"kernel": "mgpu", **pallas.tuned_entry(1, 6144, 4096, FP4Format.NVFP4, cfg)}
    with pallas.tuned_override([rec]):
        assert pallas.choose_mgpu_config(1, 6144, 4096, FP4Format.NVFP4) == cfg
        assert pallas.choose_mgpu_config(1, 6144, 4096, FP4Format.MXFP4) != cfg  # keyed by format
        assert isinstance(pallas.choose_config(1, 6144, 4096, FP4Format.NVFP4), BlockConfig)  # the Triton kernel's


@pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11),
    reason="jax >= 0.11 refuses to lower for CUDA without a GPU; CI runs jax 0.10.x",
)
@pytest.mark.parametrize("mx", [False, True])
def test_mgpu_kernel_lowers_for_cuda_on_cpu_install(mx):
    """Both forms, one token tile (M = 1: rows past M come from the TMA zero fill; M = 64) and
    several (M = 304: two 256-token tiles), through Mosaic GPU's lowering (layouts, shared memory)."""
    blk = 32 if mx else 16
    cases = [
        (1, 128, 1024, K.MgpuConfig(256, 2, 4)),
        (64, 64, 2048, K.MgpuConfig(256, 1, 3)),
        (1, 128, 1024, K.MgpuConfig(512, 1, 3)),
        (304, 128, 512, K.MgpuConfig(128, 1, 2)),
        (304, 64, 512, K.MgpuConfig(128, 2, 2)),
        (1, 256, 1024, K.MgpuConfig(256, 2, 4, ctas=3)),  # persistent: 8 units over 3 CTAs
        (304, 128, 512, K.MgpuConfig(128, 1, 2, ctas=3)),  # 4 units (2 row x 2 token tiles) over 3
        (1, 256, 1024, K.MgpuConfig(256, 2, 4, ctas=3, inflight=1)),  # a wgmma left running across steps
        (64, 64, 2048, K.MgpuConfig(256, 1, 3, inflight=1)),
        # Warp-specialized: a producer warpgroup and two consumers of 64 rows each.
        (1, 256, 1024, K.MgpuConfig(256, 2, 4, wgs=2)),
        (1, 384, 1024, K.MgpuConfig(256, 1, 3, ctas=2, wgs=2)),  # 3 units over 2 CTAs
        (304, 128, 512, K.MgpuConfig(128, 1, 2, wgs=2)),
        (1, 384, 1024, K.MgpuConfig(256, 2, 3, ctas=2, wgs=2, inflight=1)),
        # Split K summed through distributed shared memory by clusters of split_k CTAs.
        (1, 256, 1024, K.MgpuConfig(256, 2, 4, cluster=True)),
        (16, 448, 2048, K.MgpuConfig(256, 4, 4, ctas=12, cluster=True)),
        (64, 256, 2048, K.MgpuConfig(256, 2, 2, cluster=True)),
    ]
    for m, n, k, cfg in cases:
        args = [
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((k // blk, n), jnp.uint8),
        ]
        if cfg.split_k == 1 or cfg.cluster:
            args += [jax.ShapeDtypeStruct((1 + (m % 2 == 0), n), jnp.float32)]  # with and without a bias row
            f = jax.jit(lambda *a, cfg=cfg: K.fp4_matmul_fused_mgpu(*a, cfg=cfg, mx=mx))
            out = (K.padded_tokens(m), n)
        else:
            f = jax.jit(lambda *a, cfg=cfg: K.fp4_matmul_partials_mgpu(*a, cfg=cfg, mx=mx))
            out = (cfg.split_k, K.padded_tokens(m), n)
        lowered = f.trace(*args).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text() and lowered.out_info.shape == out


@pytest.mark.parametrize(
    ("m", "k", "cfg", "fused", "match"),
    [
        (12, 256, K.MgpuConfig(256, 1, 2), False, "bad shapes"),  # M >= 8 must be a multiple of 8
        (5, 256, K.MgpuConfig(256, 2, 2), False, "bad shapes"),  # K not a multiple of bk * split_k
        (5, 512, K.MgpuConfig(256, 2, 2), True, "split_k == 1"),  # the fused epilogue needs one split
        (256, 512, K.MgpuConfig(128, 1, 3), False, "shared memory"),  # 3 x 69 KiB stages + 64 KiB out
        (5, 512, K.MgpuConfig(256, 1, 1, inflight=1), False, "inflight"),  # needs a second stage
        (5, 512, K.MgpuConfig(256, 1, 2, wgs=2), False, "bad shapes"),  # 64 rows: no 128-row tile
        (5, 512, K.MgpuConfig(256, 1, 2, wgs=3), False, "wgs must be"),
        (5, 512, K.MgpuConfig(256, 2, 2, cluster=True), False, "fused output"),  # no partials to write
        (5, 768, K.MgpuConfig(256, 3, 2, cluster=True), True, "cluster reduction needs"),
        (5, 512, K.MgpuConfig(256, 2, 2, ctas=3, cluster=True), True, "cluster reduction needs"),
        (136, 512, K.MgpuConfig(256, 2, 2, cluster=True), True, "verified up to 128"),
    ],
)
def test_mgpu_kernel_rejects_bad_shapes(m, k, cfg, fused, match):
    x, codes, scales = (
        jnp.zeros((m, k), jnp.bfloat16),
        jnp.zeros((64, k // 2), jnp.uint8),
        jnp.zeros((k // 16, 64), jnp.uint8),
    )
    z = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match=match):
        if fused:
            K.fp4_matmul_fused_mgpu(x, codes, scales, z, cfg=cfg, mx=False)
        else:
            K.fp4_matmul_partials_mgpu(x, codes, scales, cfg=cfg, mx=False)


@requires_gpu
@pytest.mark.parametrize("fmt", [FP4Format.NVFP4, FP4Format.MXFP4])
@pytest.mark.parametrize(
    ("m", "n", "k", "cfg"),
    [
        (1, 64, 512, K.MgpuConfig(512, 1, 2)),
        (16, 192, 2048, K.MgpuConfig(256, 4, 4)),
        (40, 128, 1024, K.MgpuConfig(128, 1, 3)),
        (300, 128, 512, K.MgpuConfig(128, 1, 2)),  # two 256-token tiles
        (300, 64, 1024, K.MgpuConfig(128, 2, 2)),
        # Persistent grids: CTAs with unequal numbers of units, one pipeline through them all.
        (1, 320, 1024, K.MgpuConfig(256, 2, 3, ctas=3)),  # 10 units: 4, 3, 3
        (16, 448, 2048, K.MgpuConfig(512, 1, 4, ctas=4)),  # 7 units: 2, 2, 2, 1; fused epilogue
        (300, 192, 512, K.MgpuConfig(128, 1, 2, ctas=5)),  # 3 row x 2 token tiles over 5 CTAs
        (8, 128, 4096, K.MgpuConfig(256, 4, 8, ctas=2)),  # 8 units, 4 each; deeper than a unit
        # A wgmma left running across steps (and across units of a persistent CTA).
        (1, 320, 1024, K.MgpuConfig(256, 2, 3, ctas=3, inflight=1)),
        (16, 448, 2048, K.MgpuConfig(512, 1, 4, ctas=4, inflight=1)),
        (300, 128, 512, K.MgpuConfig(128, 1, 2, inflight=1)),
        # Warp-specialized (a producer warpgroup, two consumers of 64 rows of each 128-row tile).
        (1, 256, 1024, K.MgpuConfig(256, 2, 4, wgs=2)),
        (16, 384, 2048, K.MgpuConfig(512, 1, 4, ctas=2, wgs=2)),  # 3 units: 2, 1; fused epilogue
        (40, 128, 1024, K.MgpuConfig(128, 2, 3, ctas=1, wgs=2)),  # both K splits in one CTA
        (300, 256, 512, K.MgpuConfig(128, 1, 2, wgs=2)),  # two 256-token tiles (bf16 out: smem)
        (128, 512, 4096, K.MgpuConfig(128, 4, 3, ctas=3, wgs=2)),  # 16 units over 3 CTAs
        (8, 512, 4096, K.MgpuConfig(256, 4, 8, ctas=3, wgs=2)),  # deeper than a unit
        (16, 384, 2048, K.MgpuConfig(512, 1, 4, ctas=2, wgs=2, inflight=1)),
        (300, 256, 1024, K.MgpuConfig(128, 1, 2, ctas=3, wgs=2, inflight=1)),
        # Split K summed in the kernel by clusters (rank 0 reads the others' partials).
        (1, 320, 1024, K.MgpuConfig(256, 2, 3, cluster=True)),  # one cluster per unit
        (16, 448, 2048, K.MgpuConfig(256, 4, 4, ctas=12, cluster=True)),  # 7 units over 3 clusters
        (40, 128, 4096, K.MgpuConfig(256, 8, 2, ctas=8, cluster=True)),  # clusters of 8
        (8, 192, 2048, K.MgpuConfig(256, 4, 2, ctas=8, cluster=True, inflight=1)),
        (64, 256, 2048, K.MgpuConfig(256, 2, 2, cluster=True)),  # swizzled partials (whole 128-byte rows)
        (128, 192, 1024, K.MgpuConfig(256, 2, 2, ctas=4, cluster=True)),  # 3 units over 2 clusters
    ],
)
def test_mgpu_kernel_equals_exact_product_on_gpu(fmt, m, n, k, cfg):
    """Partials times 2**c (split-K) or the fused epilogue's float32 output (one split; row
    multipliers and biases applied in the kernel) against the float64 product, within float32
    summation: K * 2**-24 of sum|products| (plus the epilogue's two roundings, 2**-23 of |y|).
    The fused form writes float32 where its output tile fits in shared memory, else bf16 (one
    more rounding: 2**-8 of |y|)."""
    mx = fmt is FP4Format.MXFP4
    q = _weight(m, n, k, fmt)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    xp = jnp.pad(x, ((0, K.input_rows(m) - m), (0, 0)))  # the tile's rows past that: TMA zero fill
    codes, scales = K.kernel_operands(q.codes, q.scales)
    w = np.asarray(jaxfp4.dequantize(q, dtype=jnp.float32), np.float64)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    mag = np.abs(xf) @ np.abs(w).T
    if cfg.split_k == 1 or cfg.cluster:
        alpha = jax.random.uniform(jax.random.key(1), (n,), jnp.float32, 0.5, 2.0)
        bias = jax.random.normal(jax.random.key(2), (n,), jnp.float32)
        a = np.asarray(alpha, np.float64)
        fits = K.smem_bytes(K.token_tile(m), cfg.bk, cfg.stages, 4, fmt.block_size, cfg.wgs) <= K.SMEM_LIMIT
        out, rnd = (jnp.float32, 2.0**-23) if fits else (jnp.bfloat16, 2.0**-23 + 2.0**-8)
        for b in (bias, None):  # a bias row, and none (the epilogue's second row left out)
            e = K.epilogue_rows(K.row_multipliers(alpha, mx), b)
            y = K.fp4_matmul_fused_mgpu(xp, codes, scales, e, cfg=cfg, mx=mx, out_dtype=out)
            want = (xf @ w.T) * a + (0.0 if b is None else np.asarray(b, np.float64))
            got = np.asarray(y.astype(jnp.float32), np.float64)[:m]
            assert np.all(np.abs(got - want) <= k * 2.0**-24 * mag * a + rnd * np.abs(want) + 1e-30)
    else:
        parts = K.fp4_matmul_partials_mgpu(xp, codes, scales, cfg=cfg, mx=mx)
        got = np.asarray(parts, np.float64).sum(0)[:m] * 2.0 ** K.epilogue_exponent(mx)
        assert np.all(np.abs(got - xf @ w.T) <= k * 2.0**-24 * mag + 1e-30)


@requires_gpu
@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
@pytest.mark.parametrize(
    ("lead", "n", "k"),
    [
        ((1,), 4096, 1024),
        ((2, 3), 200, 160),
        ((16,), 1000, 512),
        ((64,), 256, 2048),
        ((96,), 384, 1024),  # the heuristic's warp-specialized form
        ((300,), 320, 512),
    ],
)
def test_fp4_linear_with_kernel_layout_matches_xla_on_gpu(recipe, lead, n, k, monkeypatch):
    """Every M through the Mosaic GPU kernel (the dispatch limit lifted), split-K and fused."""
    if k % recipe.weight_format.block_size:
        pytest.skip("K must be a multiple of the MXFP4 block (32)")
    monkeypatch.setattr(pallas, "MGPU_MAX_M", 1 << 30)
    p = jaxfp4.prepare_weights(_params(recipe, n, k, fused=True))
    x = jax.random.normal(jax.random.key(n), (*lead, k), jnp.float32).astype(jnp.bfloat16)
    assert pallas.uses_mgpu(p, x.size // k)
    y = jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p))(x, p)
    _check_against_reference(x, p, y)


# ---------------------------------------------------------------------------------------------
# Split-K partials handed on unsummed (fp4_linear_deferred, SplitKSum)


@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
def test_fp4_linear_deferred_is_fp4_linear_where_nothing_is_deferred(recipe):
    # The "xla" backend (and so every CPU run) sums nothing later: fp4_linear's array, bit for bit.
    p = _params(recipe, 96, 256, fused=True)
    x = jax.random.normal(jax.random.key(2), (2, 256), jnp.float32).astype(jnp.bfloat16)
    y = jaxfp4.ops.fp4_linear_deferred(x, p, backend="xla")
    assert not isinstance(y, jaxfp4.ops.SplitKSum)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jaxfp4.fp4_linear(x, p, backend="xla"), np.float32))


def _fake_partials(x, codes, scales, prefetch=None, *, cfg, mx, prefetch_plan=None):
    """Stands in for the Mosaic GPU partials kernel on the CPU: ``[split, Mp, Np]`` float32 that
    depend on every input row and differ by split (values irrelevant, layout the kernel's)."""
    mp, np_ = K.padded_tokens(x.shape[0]), codes.shape[0]
    w = jax.random.normal(jax.random.key(codes.shape[1]), (cfg.split_k, x.shape[1], np_), jnp.float32)
    xp = jnp.pad(x.astype(jnp.float32), ((0, mp - x.shape[0]), (0, 0)))
    return jnp.einsum("mk,skn->smn", xp, w)


@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_deferred_split_k_output_resolves_to_fp4_linear(lead, monkeypatch):
    """The plumbing on the CPU, the kernel replaced by a stand-in of its output layout: a split-K
    config without a bias returns a SplitKSum (the partials, the layout's row multipliers, the
    output's lead shape, width and dtype) whose resolve() is fp4_linear's output bit for bit;
    with a bias or one K split, fp4_linear's array."""
    monkeypatch.setattr(pallas, "_on_gpu", lambda: True)
    monkeypatch.setattr(K, "fp4_matmul_partials_mgpu", _fake_partials)
    n, k = 200, 512
    pb = jaxfp4.prepare_weights(_params(NVFP4W4A16(), n, k, fused=True))  # with a bias
    p = dataclasses.replace(pb, bias=None)
    x = jax.random.normal(jax.random.key(5), (*lead, k), jnp.float32).astype(jnp.bfloat16)
    split = K.MgpuConfig(256, 2, 2)
    monkeypatch.setattr(pallas, "choose_mgpu_config", lambda *a, **kw: split)
    d = jaxfp4.ops.fp4_linear_deferred(x, p)
    assert isinstance(d, jaxfp4.ops.SplitKSum)
    assert (d.lead, d.n, d.dtype, d.shape) == (lead, n, jnp.dtype(jnp.bfloat16), (*lead, n))
    assert d.parts.shape == (2, K.padded_tokens(x.size // k), 256)
    y = jaxfp4.fp4_linear(x, p)
    np.testing.assert_array_equal(np.asarray(d.resolve(), np.float32), np.asarray(y, np.float32))
    # A bias is added by the epilogue after the sum: nothing deferred.
    yb = jaxfp4.ops.fp4_linear_deferred(x, pb)
    assert not isinstance(yb, jaxfp4.ops.SplitKSum)
    np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(jaxfp4.fp4_linear(x, pb), np.float32))


@requires_gpu
@pytest.mark.parametrize("recipe", [pytest.param(r, id=r.name) for r in RECIPES])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_fp4_linear_deferred_resolves_to_fp4_linear_on_gpu(recipe, lead):
    """A decode shape whose config splits K: the partials come back unsummed, and their
    resolve() is fp4_linear's output bit for bit (the same sum in the same order), with the L2
    hint of a next layer too."""
    n, k = 4096, 4096
    p = dataclasses.replace(jaxfp4.prepare_weights(_params(recipe, n, k, fused=True)), bias=None)
    nxt = jaxfp4.prepare_weights(_params(recipe, 1024, k, fused=True))
    x = jax.random.normal(jax.random.key(3), (*lead, k), jnp.float32).astype(jnp.bfloat16)
    assert pallas.choose_mgpu_config(x.size // k, n, k, recipe.weight_format).split_k > 1
    y = jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p))(x, p)
    for hint in (None, nxt):
        d = jax.jit(lambda x, p, h: jaxfp4.ops.fp4_linear_deferred(x, p, prefetch=h))(x, p, hint)
        assert isinstance(d, jaxfp4.ops.SplitKSum) and d.lead == lead and d.n == n
        np.testing.assert_array_equal(np.asarray(d.resolve(), np.float32), np.asarray(y, np.float32))


# ---------------------------------------------------------------------------------------------
# The L2 prefetch of the next layer (L2Prefetch, fp4_linear's ``prefetch``)


def _schedule(plan: K.L2Prefetch) -> list[tuple[int, int]]:
    """The next kernel's (row tile, K step) reads in time order, from its persistent schedule as
    ``_build`` documents it: CTA ``c`` runs units ``c, c + G, ...``, each through its K steps;
    at each time slot every CTA that still has work reads one tile (CTAs in index order)."""
    per_cta = []
    for c in range(plan.ctas):
        seq = []
        for u in range(c, plan.units, plan.ctas):
            ni, si = u % plan.row_tiles, u // (plan.row_tiles * plan.token_tiles)
            seq += [(ni, si * plan.steps + j) for j in range(plan.steps)]
        per_cta.append(seq)
    return [s[t] for t in range(max(map(len, per_cta))) for s in per_cta if t < len(s)]


@pytest.mark.parametrize(
    ("m", "n", "k", "cfg"),
    [
        (1, 6144, 4096, K.MgpuConfig(256, 4, 3, ctas=384)),  # one CTA per unit, split K
        (1, 320, 1024, K.MgpuConfig(256, 2, 3, ctas=3)),  # persistent, unequal shares: 4, 3, 3
        (16, 448, 2048, K.MgpuConfig(512, 1, 4, ctas=4)),
        (300, 256, 1024, K.MgpuConfig(128, 2, 2, ctas=3, wgs=2)),  # two token tiles: tiles repeat
    ],
)
def test_prefetch_plan_follows_the_next_kernels_read_order(m, n, k, cfg, monkeypatch):
    """The plan's items, holes (a CTA without a unit at that time slot) dropped, are the next
    kernel's reads in time order, cut at the byte budget: every prefix of the budget gets the
    tiles read first, and the whole budget the whole weight once per token tile."""
    monkeypatch.setattr(pallas, "choose_mgpu_config", lambda *a, **kw: cfg)
    nxt = jaxfp4.prepare_weights(_params(NVFP4W4A16(), n, k, fused=False))
    tile_bytes = cfg.rows * cfg.bk // 2 + cfg.bk // 16 * cfg.rows
    full = pallas.l2_prefetch_plan(m, nxt, budget=1 << 40)
    want = _schedule(full)
    assert len(want) == full.units * full.steps
    for budget in (tile_bytes, 5 * tile_bytes + 1, len(want) * tile_bytes // 3, 1 << 40):
        plan = pallas.l2_prefetch_plan(m, nxt, budget=budget)
        got = [t for i in range(plan.count) if (t := plan.tile(i)) is not None]
        assert len(got) * tile_bytes <= budget and got == want[: len(got)]
        assert plan.count == min(budget // tile_bytes, -(-plan.units // plan.ctas) * plan.steps * plan.ctas)
    got = [t for i in range(full.count) if (t := full.tile(i)) is not None]
    tiles = [(ni, kk) for ni in range(full.row_tiles) for kk in range(k // cfg.bk)]
    assert sorted(got) == sorted(tiles * full.token_tiles)  # each token tile reads the whole weight
    assert pallas.l2_prefetch_plan(m, nxt, budget=tile_bytes - 1) is None
    assert pallas.l2_prefetch_plan(m, _params(NVFP4W4A16(), n, k, fused=False)) is None  # no kernel layout


@pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11),
    reason="jax >= 0.11 refuses to lower for CUDA without a GPU; CI runs jax 0.10.x",
)
@pytest.mark.parametrize("mx", [False, True])
def test_mgpu_kernel_with_l2_prefetch_lowers_for_cuda_on_cpu_install(mx):
    """Both outputs (fused, split-K partials), with a next layer of another shape and schedule
    (wider tiles, unequal shares), lower through Mosaic GPU with the next layer's two arrays as
    operands; the pallas backend's ``forward(..., prefetch=)`` on prepared params reaches the
    kernel with them."""
    blk = 32 if mx else 16
    plan = K.L2Prefetch(rows=128, bk=256, block=blk, steps=2, row_tiles=3, token_tiles=1, units=6, ctas=4, count=9)
    nxt = (jax.ShapeDtypeStruct((384, 512 // 2 * 2), jnp.uint8), jax.ShapeDtypeStruct((1024 // blk, 384), jnp.uint8))
    for m, n, k, cfg in [(1, 256, 1024, K.MgpuConfig(256, 2, 4, ctas=3)), (16, 448, 2048, K.MgpuConfig(512, 1, 4, ctas=4))]:
        args = [
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((k // blk, n), jnp.uint8),
        ]
        if cfg.split_k == 1:
            args.append(jax.ShapeDtypeStruct((1, n), jnp.float32))
            f = jax.jit(lambda *a, cfg=cfg: K.fp4_matmul_fused_mgpu(*a[:4], a[4:], cfg=cfg, mx=mx, prefetch_plan=plan))
        else:
            f = jax.jit(lambda *a, cfg=cfg: K.fp4_matmul_partials_mgpu(*a[:3], a[3:], cfg=cfg, mx=mx, prefetch_plan=plan))
        text = f.trace(*args, *nxt).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and "384x512xui8" in text
    recipe = MXFP4W4A16() if mx else NVFP4W4A16()
    p = jaxfp4.prepare_weights(_params(recipe, 512, 1024, fused=False))
    q = jaxfp4.prepare_weights(_params(recipe, 384, 512, fused=False))
    x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
    calls = {}
    for name, pf in (("without", None), ("with", q)):
        f = jax.jit(lambda x, p, q, pf=pf: pallas.forward(x, p, None, jnp.bfloat16, prefetch=q if pf else None))
        calls[name] = f.trace(x, p, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "384x256xui8" in calls["with"] and "384x256xui8" not in calls["without"]


def test_prefetch_hint_is_checked():
    p = _params(NVFP4W4A16(), 64, 256, fused=False)
    x = jnp.zeros((1, 256), jnp.bfloat16)
    with pytest.raises(TypeError, match="prefetch must be Fp4LinearParams"):
        jaxfp4.fp4_linear(x, p, prefetch=p.weight)
    plan = K.L2Prefetch(rows=64, bk=256, block=16, steps=1, row_tiles=1, token_tiles=1, units=1, ctas=1, count=1)
    codes, scales = jnp.zeros((64, 128), jnp.uint8), jnp.zeros((16, 64), jnp.uint8)
    with pytest.raises(ValueError, match="come together"):
        K.fp4_matmul_partials_mgpu(x, codes, scales, cfg=K.MgpuConfig(256, 1, 2), mx=False, prefetch_plan=plan)
    with pytest.raises(ValueError, match="does not fit"):  # codes of another shape than the plan's
        K.fp4_matmul_partials_mgpu(
            x, codes, scales, (codes[:, :64], scales), cfg=K.MgpuConfig(256, 1, 2), mx=False, prefetch_plan=plan
        )
    with pytest.raises(ValueError, match="one-warpgroup"):
        K.fp4_matmul_partials_mgpu(
            x,
            jnp.zeros((128, 128), jnp.uint8),
            jnp.zeros((16, 128), jnp.uint8),
            (codes, scales),
            cfg=K.MgpuConfig(256, 1, 2, wgs=2),
            mx=False,
            prefetch_plan=plan,
        )


@requires_gpu
@pytest.mark.parametrize("fmt", [FP4Format.NVFP4, FP4Format.MXFP4])
@pytest.mark.parametrize(
    ("m", "n", "k", "cfg"),
    [
        (1, 320, 1024, K.MgpuConfig(256, 2, 3, ctas=3)),  # split-K partials
        (16, 448, 2048, K.MgpuConfig(512, 1, 4, ctas=4)),  # fused epilogue
    ],
)
def test_l2_prefetch_changes_no_output_bit_on_gpu(fmt, m, n, k, cfg):
    """The kernel with a next layer to prefetch (all of it, and a part) gives the same bits as
    without: the prefetch only issues cache hints."""
    mx = fmt is FP4Format.MXFP4
    q, q2 = _weight(m, n, k, fmt), _weight(m + 1, 384, 2048, fmt)
    x = jnp.pad(jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16), ((0, K.input_rows(m) - m), (0, 0)))
    codes, scales = K.kernel_operands(q.codes, q.scales)
    nxt = K.kernel_operands(q2.codes, q2.scales)
    blk = fmt.block_size
    plans = [
        K.L2Prefetch(rows=64, bk=512, block=blk, steps=2, row_tiles=6, token_tiles=1, units=12, ctas=12, count=count)
        for count in (24, 7)
    ]
    e = K.epilogue_rows(K.row_multipliers(jnp.ones((n,), jnp.float32), mx))
    for plan in [None, *plans]:
        pf = dict(prefetch=None if plan is None else nxt, prefetch_plan=plan)
        if cfg.split_k == 1:
            y = K.fp4_matmul_fused_mgpu(x, codes, scales, e, cfg=cfg, mx=mx, **pf)
        else:
            y = K.fp4_matmul_partials_mgpu(x, codes, scales, cfg=cfg, mx=mx, **pf)
        if plan is None:
            base = np.asarray(y)
        else:
            np.testing.assert_array_equal(np.asarray(y), base)
