"""The "pallas" backend: FP4-weight GEMM kernels for NVIDIA GPUs (Pallas: Mosaic GPU and Triton).

What it computes, for all four recipes (``alpha_n`` = the weight row's global multiplier,
1 for MXFP4):

* activations prepared exactly as the "xla" backend does (W4A4: NVFP4 quantize-dequantize, the
  same function, so codes and scales are bit-identical; in vLLM mode it runs as one Pallas kernel,
  :mod:`jaxfp4.kernels.act_triton`; W4A8: the same FP8 codes, with the static
  activation scale applied in the epilogue instead of to each activation; for the Mosaic GPU
  kernel the codes' values come as bf16, from ``FP8_ACT_KERNEL_MIN_M`` rows on from one Pallas
  kernel, ``fp8_static_values``);
* ``y[m, n] = alpha_n * sum_k x[m, k] * (q[n, k] * s[n, k/B])`` with the E2M1 x scale product
  exact and float32 accumulation; bias added in float32; output in ``x.dtype``.

Kernels: on params carrying a :class:`~jaxfp4.ops.params.KernelLayout` (made once by
:func:`prepare_weights`), the Mosaic GPU kernel (:mod:`jaxfp4.kernels.w4a16_mgpu`: TMA pipeline,
weights expanded in registers straight into wgmma, the epilogue in the kernel when K is not
split), for every M (``MGPU_MAX_M``); otherwise the Triton-lowered
W4A16 kernel (bf16 tensor cores; every recipe) and, for MXFP4 W4A8, the FP8 kernel (FP8 tensor
cores; :mod:`jaxfp4.kernels.w4a8_triton`). For W4A8 the tuned config (or the heuristic) picks one
of the Triton kernels by M: the FP8 kernel's config has ``dequant="fp8"``; the others take the
FP8 activation values as bf16 (exact). Params without a kernel layout never get one silently
(re-laying out a weight on every call would cost a full pass over it).

Numerically this differs from the "xla" reference only by where the global multiplier and the
W4A8 activation scale are applied (the reference rounds ``q * s * alpha`` and ``fp8 * scale`` to
bf16 per element, the kernels apply them to the float32 sum) and by summation order: see
``tests/kernels/test_w4a16.py`` and ``tests/kernels/test_w4a8.py``.

Shapes are padded inside (M to the row tile, N to the weight tile, K to ``bk * split_k``; zero
codes and zero scales add nothing) and sliced back. Activations must be bfloat16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import operator
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from jaxfp4.formats import (
    MXFP4W4A8,
    NVFP4W4A4,
    FP4Format,
    codecs,
    dequantize,
    fake_quantize_nvfp4_activations,
    mxfp4_as_e4m3,
    mxfp4_e4m3_bytes,
    mxfp4_e4m3_window,
    quantize_fp8_static,
)
from jaxfp4.formats.tensor import ActivationQuant
from jaxfp4.kernels.act_triton import fake_quantize_nvfp4_vllm, fp8_static_values
from jaxfp4.ops.params import Fp4LinearParams, KernelLayout
from jaxfp4.ops.xla import gemm_weight

NAME = "pallas"
_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "configs"
_interpret = False


@contextlib.contextmanager
def pallas_interpret(enabled: bool = True) -> Iterator[None]:
    """Run the "pallas" backend in Pallas interpret mode (on CPU too), for tests and debugging."""
    global _interpret
    old, _interpret = _interpret, enabled
    try:
        yield
    finally:
        _interpret = old


def interpreting() -> bool:
    """Whether :func:`pallas_interpret` is on (kernels outside this backend follow it too)."""
    return _interpret


def kernels_run_here() -> bool:
    """Whether Pallas kernels can run: on a GPU, or anywhere under :func:`pallas_interpret`."""
    return _interpret or _on_gpu()


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def unsupported_reason(x: jax.Array, params: Fp4LinearParams) -> str | None:
    if not kernels_run_here():
        return "needs an NVIDIA GPU (or pallas_interpret())"
    if x.dtype != jnp.bfloat16:
        return f"kernels take bfloat16 activations, got {x.dtype}"
    return None


def _device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except RuntimeError:
        return "cpu"


def _load_tuned() -> dict[str, list[dict]]:
    """Tuned configs, one JSON file per device kind (written by ``kernels/tune.py``)."""
    out: dict[str, list[dict]] = {}
    for f in sorted(_CONFIG_DIR.glob("*.json")):
        data = json.loads(f.read_text())
        out[data["device_kind"]] = data["configs"]
    return out


_TUNED = _load_tuned()


@contextlib.contextmanager
def tuned_override(entries: list[dict]) -> Iterator[None]:
    """Use ``entries`` (records from :func:`tuned_entry`) as this device kind's tuned configs inside
    the block, then restore what was there (for tests and the kernel lab's sweeps)."""
    device = _device_kind()
    saved = _TUNED.get(device)
    _TUNED[device] = list(entries)
    try:
        yield
    finally:
        _TUNED.pop(device, None)
        if saved is not None:
            _TUNED[device] = saved


def m_bucket(m: int) -> int:
    """The row-count bucket that tuned configs are keyed by (``1 << 62``: any larger M)."""
    return next(b for b in (1, 16, 32, 64, 128, 256, 1 << 62) if m <= b)


def tuned_entry(m: int, n: int, k: int, fmt: FP4Format, cfg, acts: str = "bf16") -> dict:
    """One record of a tuned-config file (``kernels/bench_gemm.py`` writes them); ``acts`` is
    ``"bf16"`` (W4A16, W4A4) or ``"fp8"`` (W4A8: either kernel may win)."""
    return dict(m_bucket=m_bucket(m), n=n, k=k, format=fmt.value, acts=acts, config=dataclasses.asdict(cfg))


def choose_config(m: int, n: int, k: int, fmt: FP4Format, acts: str = "bf16"):
    """A tuned config for (M bucket, N, K, activation kind) on this device kind, else a heuristic
    one. For ``acts="fp8"`` (MXFP4 W4A8) a config with ``dequant="fp8"`` selects the FP8 kernel."""
    from jaxfp4.kernels.w4a16_triton import BlockConfig

    bucket = m_bucket(m)
    for rec in _TUNED.get(_device_kind(), []):
        if rec.get("kernel", "triton") != "triton":
            continue
        if (rec["m_bucket"], rec["n"], rec["k"], rec["format"], rec.get("acts", "bf16")) == (bucket, n, k, fmt.value, acts):
            return BlockConfig(**rec["config"])
    if acts == "fp8":
        # The W4A16 kernel on the exact FP8 values: on the H100 it beat the FP8 kernel at every M
        # (kernels/results/tune-w4a8-*.json), and its float32 accumulation is exact per product.
        return choose_config(m, n, k, fmt)
    # Untuned shapes: the patterns that won on the H100 sweep (kernels/results/bench-*.log).
    if m <= 16:
        return BlockConfig(16, 128, 512, default_split(n, k, 128, 512), num_warps=8, num_stages=3, dequant="asm")
    if m <= 64:
        bm = max(16, bucket)
        return BlockConfig(bm, 64, 256, default_split(n, k, 64, 256), num_warps=4, num_stages=3, dequant="asm")
    if m <= 256:
        return BlockConfig(128, 64, 128, default_split(n, k, 64, 128, 132), num_warps=4, num_stages=3, dequant="asm")
    return BlockConfig(128, 256, 64, 1, num_warps=8, num_stages=3, dequant="asm")


def default_split(n: int, k: int, bn: int, bk: int, programs: int = 264) -> int:
    """Smallest power-of-two split-K giving about ``programs`` programs (2 per H100 SM) while
    each split keeps at least 4 K steps and divides K."""
    n_blocks, split = -(-n // bn), 1
    while n_blocks * split < programs and k % (bk * split * 2) == 0 and k // (bk * split * 2) >= 4:
        split *= 2
    return split


# Rows served by the Mosaic GPU kernel when the params carry its layout: every M below DENSE_MIN_M,
# and above it wherever its warp-specialized form serves bf16 activations (elsewhere the dense
# path runs; see uses_dense). On the H100 it
# beat the Triton kernel at M = 4096 (0.57-0.65x of bf16 vs 0.41-0.48x) and matched it at M = 128
# (kernels/results/history/gemm-*-2026-11-23.json, "pallas" and "pallas_triton"); lower this
# in the kernel lab to compare.
MGPU_MAX_M = 1 << 62


def prepare_weights(params: Fp4LinearParams) -> Fp4LinearParams:
    """``params`` plus a :class:`KernelLayout` of its weight for the Mosaic GPU kernel.

    Pure (a new pytree; ``params`` is untouched) and done once, at load time: it rewrites every
    weight byte. Works on any backend (the "xla" path ignores the layout); jit it to run it on
    the device that holds the weight. Weights with ``K % 32 != 0`` are returned unchanged.

    The layout's ``row_scale`` folds in the weight's global scales and, for MXFP4 W4A8, the
    activation scale as they are now (so a call computes nothing per layer before the kernel);
    prepare again after replacing either."""
    from jaxfp4.kernels import w4a16_mgpu

    w = params.weight
    if w.k % w4a16_mgpu.CHUNK:
        return params
    np_ = -(-w.n // w4a16_mgpu.ROWS) * w4a16_mgpu.ROWS
    kp = -(-w.k // w4a16_mgpu.SUB_K) * w4a16_mgpu.SUB_K
    codes = jnp.pad(w.codes, ((0, np_ - w.n), (0, (kp - w.k) // 2)))
    scales = jnp.pad(w.scales, ((0, np_ - w.n), (0, (kp - w.k) // w.block_size)))  # zero codes, zero bytes
    alpha = jnp.where(w4a16_mgpu.nan_rows(w.scales), jnp.nan, _kernel_alpha(params))  # NaN products
    row_scale = jnp.pad(w4a16_mgpu.row_multipliers(alpha, w.format is FP4Format.MXFP4), (0, np_ - w.n))
    layout = KernelLayout(*w4a16_mgpu.kernel_operands(codes, scales), row_scale, w.n, w.k)
    return dataclasses.replace(params, kernel_layout=layout)


def _kernel_alpha(params: Fp4LinearParams) -> jax.Array:
    """float32 ``(N,)``: what the kernels multiply the float32 sum ``x @ (Q*S).T`` by (before any
    exponent offset of their own): the weight row's global multiplier (1 for MXFP4), times the
    static activation scale for MXFP4 W4A8 (whose kernels take the FP8 codes' values)."""
    w = params.weight
    alpha = w.row_global_multiplier()
    alpha = jnp.ones((w.n,), jnp.float32) if alpha is None else alpha
    if isinstance(params.recipe, MXFP4W4A8):
        alpha = alpha * params.input_scale
    return alpha


def sm_count() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM; 132 off a GPU)."""
    if not _on_gpu():
        return 132
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def choose_mgpu_config(m: int, n: int, k: int, fmt: FP4Format = FP4Format.NVFP4, out_bytes: int = 2):
    """Mosaic GPU kernel config for ``m`` tokens, a padded ``(n, k)`` weight and outputs of
    ``out_bytes`` per element: this device
    kind's tuned record (``kernel: "mgpu"``, written by ``kernels/tune_mgpu.py``) if any, else a
    heuristic: split K until there are about two units of work per SM (while each split keeps
    >= 1024 K), 512-K steps with 3 stages where each split has >= 2048 K, else 256-K steps with
    4 stages, fewer stages / smaller steps until two CTAs fit in an SM's shared memory; one CTA
    per unit of work up to 3 units per SM (at 4096 x 6144, M = 1, 384 one-unit CTAs took 10.2 us
    where 192 CTAs of two units took 12.5: more resident warpgroups hide the expansion's
    latency; ``kernels/results/tune-mgpu-*.json``), beyond that a persistent grid of as many
    CTAs as fit at once (at most two per SM) sharing the units evenly.

    From :data:`WS_MIN_M` tokens on, where ``n`` is a multiple of 128, the warp-specialized form
    (``wgs=2``, :func:`_ws_config`) where it fits in shared memory and has work for most SMs."""
    from jaxfp4.kernels import w4a16_mgpu as K

    bucket = m_bucket(m)
    for rec in _TUNED.get(_device_kind(), []):
        if rec.get("kernel") == "mgpu" and (rec["m_bucket"], rec["n"], rec["k"], rec["format"]) == (bucket, n, k, fmt.value):
            return K.MgpuConfig(**rec["config"])
    mt = K.token_tile(m)
    np_, sms = -(-n // K.ROWS) * K.ROWS, sm_count()
    if m >= WS_MIN_M and np_ % (2 * K.ROWS) == 0 and (ws := _ws_config(m, np_, k, out_bytes, sms, fmt)):
        return ws
    tiles, split = K.work_units(m, np_, 1), 1
    while tiles * split < 256 and k % (256 * split * 2) == 0 and k // (split * 2) >= 1024:
        split *= 2
    ks = k // split
    bk, stages = (512, 3) if ks % 512 == 0 and ks >= 2048 else (256, 4) if ks % 256 == 0 else (128, 4)
    out_tile = out_bytes if split == 1 else 4  # the fused epilogue's output tile, else float32 partials
    while K.smem_bytes(mt, bk, stages, out_tile) > K.SMEM_LIMIT // 2 and (stages > 2 or bk > K.SUB_K):
        if stages > 2:
            stages -= 1
        else:
            bk //= 2
    units = tiles * split
    if units <= 3 * sms:  # one CTA per unit: the GPU packs as many per SM as fit
        # Two K splits: summed in the kernel by clusters of two CTAs (CLUSTER_SPLITS), where the
        # output tile and the partial fit beside the pipeline.
        smem = K.smem_bytes(mt, bk, stages, out_bytes) + K.ROWS * mt * 4
        cluster = split in CLUSTER_SPLITS and mt <= CLUSTER_MAX_TOKENS and smem <= K.SMEM_LIMIT // 2
        return K.MgpuConfig(bk, split, stages, ctas=units, cluster=cluster)
    resident = max(1, min(2, K.SMEM_LIMIT // K.smem_bytes(mt, bk, stages, out_tile)))  # CTAs per SM
    per_cta = -(-units // (resident * sms))
    return K.MgpuConfig(bk, split, stages, ctas=-(-units // per_cta))


# K splits whose partials the heuristic sums in the kernel, by a cluster of that many CTAs through
# distributed shared memory (``MgpuConfig.cluster``), rather than by an XLA fusion after it.
# Measured on the H100 (kernels/tune_mgpu.py --compare-cluster, GPU time of the layer, session 19):
# 8192 x 8192 at split 2: M = 1 19.3 -> 18.1 us, M = 16 19.9 -> 18.5; clusters of 4 lost at every
# shape tried (M = 1: 4096 x 6144 9.6 -> 10.1, 4096 x 4096 7.4 -> 8.0, 14336 x 4096 16.5 -> 19.9;
# M = 16: 10.2 -> 12.0, 8.0 -> 8.1, 17.5 -> 22.2): the cluster barriers cost more than the sum.
CLUSTER_SPLITS = (2,)
# Token tiles up to which it does: measured at M = 1 and 16 only, and w4a16_mgpu refuses tiles of
# more than CLUSTER_MAX_TILE tokens (see there).
CLUSTER_MAX_TOKENS = 16

# Tokens from which the heuristic picks the warp-specialized kernel form (two consumer warpgroups
# share each activation tile, so activations are read from L2 half as often, and one warpgroup's
# expansion overlaps the other's wgmma). Measured on the H100 (kernels/results/tune-mgpu-*.json,
# session 13), GPU time per layer, one-warpgroup form -> warp-specialized:
#   M = 128: 4096 x 14336 42.1 -> 31.1 us, 8192 x 8192 39.3 -> 37.9, 14336 x 4096 35.3 -> 34.2;
#   M = 256: 4096 x 14336 87.0 -> 50.5 (112 units), but 8192 x 8192 79.3 -> 91.5 (64 units) and
#   14336 x 4096 70.8 -> 153.9 (32 units): 256-token tiles leave no room for split-K partials;
#   M = 1024: 287 -> 189, 278 -> 158, 322 -> 186; M = 4096: 1143 -> 685, 1114 -> 626, 1281 -> 742.
# At M = 1 and 16 it won on 4096 x 14336 (19.6 / 21.2 -> 18.4 / 19.5 us) and lost on 14336 x 4096
# (18.3 -> 20.8), so decode keeps the one-warpgroup form (and its tuned records).
WS_MIN_M = 65
WS_MIN_UNITS = 0.7  # times the SM count: fewer units of work than that leave SMs idle (see M = 256)


def _ws_config(m: int, np_: int, k: int, out_bytes: int, sms: int, fmt: FP4Format):
    """The warp-specialized config (one CTA per SM: 128-row tiles): split K while the units stay
    within one per SM (each split >= 512 K) and the float32 partial tiles fit; 256-K steps with up
    to 4 stages if two fit in shared memory, else 128-K steps; a persistent grid of at most one
    CTA per SM. None if nothing fits or there are fewer than ``WS_MIN_UNITS`` units per SM."""
    from jaxfp4.kernels import w4a16_mgpu as K

    mt, blk = K.token_tile(m), fmt.block_size
    tiles, split = K.work_units(m, np_, 1, 2), 1
    while tiles * split * 2 <= sms and k % (K.SUB_K * split * 2) == 0 and k // (split * 2) >= 512:
        split *= 2
    while split >= 1:
        ks, ob = k // split, out_bytes if split == 1 else 4
        for bk in (256, 128):
            stages = 4
            while stages > 2 and K.smem_bytes(mt, bk, stages, ob, blk, 2) > K.SMEM_LIMIT:
                stages -= 1
            if ks % bk == 0 and K.smem_bytes(mt, bk, stages, ob, blk, 2) <= K.SMEM_LIMIT:
                units = tiles * split
                if units < WS_MIN_UNITS * sms:
                    return None
                return K.MgpuConfig(bk, split, stages, ctas=-(-units // -(-units // sms)), wgs=2)
        split //= 2
    return None


# Rows of activations from which ``forward`` expands the weight once per call and runs XLA's
# tensor-core GEMM (cuBLAS) on it instead of an FP4 kernel: ``"bf16"`` for W4A16 / W4A4 (the
# reference's bf16 weight), ``"fp8"`` for MXFP4 W4A8 (an exact FP8 weight on the FP8 tensor cores,
# see :func:`dense_forward`). At large M the GEMM is compute-bound and expanding costs one pass over
# the weight (read 4.5 bits, write 16 or 8 per element: 65 us for 4096 x 14336 to bf16), while the
# Mosaic GPU kernel repeats its expansion for every token tile. Measured on the H100 by CUPTI
# (kernels/results/prefill-probe-*.json), W4A16 dense vs kernel: M = 512 169.7 vs 166.7 us
# (4096 x 14336), M = 768 0.66-0.68x vs 0.57-0.64x of bf16 (three Llama shapes), M = 4096 0.92x vs
# 0.64x; W4A8 (FP8 GEMM): M = 768 a tie, M = 1024 and up the dense path.
# Since the warp-specialized kernel form (session 13, same probe), bf16 activations stay on the
# kernel wherever the heuristic picks that form (:func:`uses_dense`): kernel vs dense, of bf16,
# M = 768 0.97 / 0.79 / 0.80x vs 0.68 / 0.67 / 0.67x (4096 x 14336, 14336 x 4096, 8192 x 8192),
# M = 2048 1.03 / 0.98 / 1.00x vs 0.85 / 0.84 / 0.84x, M = 4096 1.03 / 0.98 / 1.00x vs 0.91x each.
# W4A8 keeps its FP8 GEMM from M = 1024 (M = 4096: 1.25 / 0.97 / 1.19x vs the kernel's 0.97 / 0.70
# / 0.86x on FP8 values in bf16). Float32 outputs at large M leave the warp-specialized form no
# shared memory, so they take the dense path (session 14, H100, GPU time, 4096 x 14336 at M = 2048:
# 367 us, where the one-warpgroup kernel took 560 and bf16 outputs on the warp-specialized one 343).
DENSE_MIN_M = {"bf16": 768, "fp8": 1024}


def uses_dense(m: int, acts: str = "bf16", params: Fp4LinearParams | None = None, out_bytes: int = 2) -> bool:
    """Whether ``forward`` runs the expand-then-GEMM path for ``m`` rows (``acts`` as
    :data:`DENSE_MIN_M`). With ``params``: not where bf16 activations go to the warp-specialized
    Mosaic GPU kernel (a single-shard kernel layout and a config with ``wgs == 2`` for outputs of
    ``out_bytes`` per element: float32 output tiles may leave it no shared memory), which is
    faster there."""
    if m < DENSE_MIN_M[acts]:
        return False
    if acts != "bf16" or params is None or not _mgpu_layout(params):
        return True
    return choose_mgpu_config(m, *params.kernel_layout.padded_shape, params.weight.format, out_bytes).wgs == 1


def _mgpu_layout(params: Fp4LinearParams) -> bool:
    kl = params.kernel_layout
    return kl is not None and kl.shards == 1 and not _interpret


def uses_mgpu(params: Fp4LinearParams, m: int, acts: str = "bf16", out_bytes: int = 2) -> bool:
    """Whether ``forward`` runs the Mosaic GPU kernel for ``m`` rows of activations and outputs
    of ``out_bytes`` per element."""
    return _mgpu_layout(params) and m <= MGPU_MAX_M and not uses_dense(m, acts, params, out_bytes)


def dense_forward(
    x2: jax.Array, params: Fp4LinearParams, acts: str, bias: jax.Array | None, out_dtype: jnp.dtype
) -> jax.Array:
    """``(M, N)`` by XLA's GEMM on the weight expanded once (the large-M path).

    * ``acts == "bf16"`` (W4A16; W4A4 after its activation quantization): ``x2 @ W.T`` with ``W``
      the "xla" reference's own bf16 weight (``q * s * alpha`` rounded per element,
      :func:`jaxfp4.ops.xla.gemm_weight`) and float32 accumulation: the reference's arithmetic,
      up to summation order. An optimization barrier keeps XLA from fusing the expansion into
      its GEMM's operand loads (which repeats it per output tile).
    * ``acts == "fp8"`` (MXFP4 W4A8; ``x2`` the FP8 activation codes): the weight as exact E4M3
      values times one power of two (:func:`jaxfp4.formats.mxfp4_as_e4m3`), an E4M3 x E4M3
      GEMM with float32 accumulation, then ``input_scale * 2**shift`` on the float32 sum (as the
      kernels apply the activation scale). The scale-only window test picks the FP8 GEMM at run
      time (``lax.cond``; the E4M3 weight is made inside the branch); outside it the per-value
      check of ``mxfp4_as_e4m3`` decides, and a weight E4M3 cannot hold runs the same product in
      bf16 (exact values there too). All branches are compiled.
    """
    w = params.weight
    dims = (((1,), (1,)), ((), ()))
    if acts == "fp8":
        shift, window = mxfp4_e4m3_window(w)
        scale = params.input_scale.astype(jnp.float32).reshape(())

        def fp8(x8: jax.Array) -> jax.Array:
            w8 = lax.optimization_barrier(mxfp4_e4m3_bytes(w, shift))  # made in the branch: not copied into it
            y = lax.dot_general(x8, w8, dims, preferred_element_type=jnp.float32)
            return _epilogue(y, scale * codecs.ldexp_f32(jnp.float32(1.0), shift), bias, out_dtype)

        def bf16(x8: jax.Array) -> jax.Array:
            xb = codecs.decode_e4m3(x8).astype(jnp.bfloat16)  # exact
            wb = lax.optimization_barrier(dequantize(w, jnp.bfloat16))  # exact: q * 2**(e-127)
            return _epilogue(lax.dot_general(xb, wb, dims, preferred_element_type=jnp.float32), scale, bias, out_dtype)

        def checked(x8: jax.Array) -> jax.Array:  # outside the window: exact value by value?
            return lax.cond(mxfp4_as_e4m3(w)[2], fp8, bf16, x8)

        return lax.cond(window, fp8, checked, x2)
    wq = lax.optimization_barrier(gemm_weight(w, jnp.bfloat16))  # alpha is in it already
    return _epilogue(lax.dot_general(x2, wq, dims, preferred_element_type=jnp.float32), None, bias, out_dtype)


# Bytes of the next layer's weight (codes and scale bytes) that a decode kernel asks into L2 as it
# finishes (``fp4_linear(..., prefetch=next_params)``, :class:`~jaxfp4.kernels.w4a16_mgpu.L2Prefetch`).
# At decode the kernels between two GEMMs (norms, attention, split-K sums) run for ~2-8 us with
# HBM idle. Measured on the H100 in the Llama-3-8B decode step, b1 (kernels/profile_decode.py,
# probe_prefetch.py; results/history/prefetch-*, session 19): the Mosaic GPU kernels 1856 -> 1782
# us a step with 4 or 8 MiB (q/k/v 8.1 -> 7.6 us, o_proj 6.1 -> 5.6, gate/up 28.5 -> 27.8, down
# 15.3 -> 14.6), but from 8 MiB the split-K sums after o_proj and down_proj slow down behind the
# prefetch (96 -> 124 us a step) and decode tokens/s fall (16 MiB -2.6%, 32 MiB -5%). Even a
# weight read wholly from L2 gains little: these kernels' time is mostly their fixed cost.
L2_PREFETCH_BYTES = 4 << 20


def l2_prefetch_plan(m: int, nxt: Fp4LinearParams, budget: int | None = None, out_bytes: int = 2):
    """The :class:`~jaxfp4.kernels.w4a16_mgpu.L2Prefetch` of layer ``nxt`` for a kernel of ``m``
    tokens: the first tiles, in the order its own kernel will read them (its config for ``m``
    tokens and outputs of ``out_bytes``), up to ``budget`` bytes (default
    :data:`L2_PREFETCH_BYTES`). None where ``nxt`` would not run the Mosaic GPU kernel at ``m``
    (another path, another schedule) or the budget holds no tile."""
    from jaxfp4.kernels import w4a16_mgpu as K

    if not uses_mgpu(nxt, m, "fp8" if isinstance(nxt.recipe, MXFP4W4A8) else "bf16", out_bytes):
        return None
    np_, kp = nxt.kernel_layout.padded_shape
    fmt = nxt.weight.format
    cfg = choose_mgpu_config(m, np_, kp, fmt, out_bytes)
    block = 32 if fmt is FP4Format.MXFP4 else 16
    tile_bytes = cfg.rows * cfg.bk // 2 + cfg.bk // block * cfg.rows
    units = K.work_units(m, np_, cfg.split_k, cfg.wgs)
    steps = kp // cfg.split_k // cfg.bk
    ctas = min(units, cfg.ctas) if cfg.ctas > 0 else units
    slots = -(-units // ctas) * steps * ctas  # items, holes included (L2Prefetch.tile)
    count = min(slots, (L2_PREFETCH_BYTES if budget is None else budget) // tile_bytes)
    if count <= 0:
        return None
    mt = K.token_tile(m)
    return K.L2Prefetch(
        rows=cfg.rows,
        bk=cfg.bk,
        block=block,
        steps=steps,
        row_tiles=np_ // cfg.rows,
        token_tiles=K.padded_tokens(m) // mt,
        units=units,
        ctas=ctas,
        count=count,
    )


def split_sum(parts: jax.Array) -> jax.Array:
    """Split-K partials ``[S, ...]`` summed in split order, ``((p0 + p1) + p2) + ...``, in
    float32: the order that :mod:`jaxfp4.kernels.norm_triton` repeats when it sums a
    :class:`SplitKSum` itself, so that both give the same bits."""
    return functools.reduce(operator.add, [parts[i] for i in range(parts.shape[0])])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["parts", "row_scale"], meta_fields=["lead", "n", "dtype"])
@dataclasses.dataclass(frozen=True)
class SplitKSum:
    """A linear layer's output one step short of done: the Mosaic GPU kernel's split-K partials
    before their sum (what :func:`jaxfp4.ops.fp4_linear_deferred` returns at decode shapes), so
    that the kernel that consumes the output (the residual add + RMSNorm,
    :func:`jaxfp4.kernels.norm_triton.add_rms_norm`) sums them in its own pass instead of XLA
    in a kernel of its own.

    ``parts``: float32 ``[S, Mp, Np]``: split ``s``'s sum for token ``m`` and weight row ``n``,
    times ``2**-c`` (:func:`jaxfp4.kernels.w4a16_mgpu.fp4_matmul_partials_mgpu`; a token's
    partials are contiguous rows); ``row_scale``: float32 ``(Np,)``, ``alpha * 2**c`` per row.
    The output has shape ``lead + (n,)`` and dtype ``dtype``: :meth:`resolve`."""

    parts: jax.Array
    row_scale: jax.Array
    lead: tuple[int, ...]
    n: int
    dtype: jnp.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The output's shape, ``lead + (n,)``."""
        return (*self.lead, self.n)

    def resolve(self) -> jax.Array:
        """The layer's output as :func:`jaxfp4.fp4_linear` returns it: ``split_sum(parts) *
        row_scale`` rounded to ``dtype``, ``lead + (n,)``."""
        m = math.prod(self.lead)
        y = _epilogue(split_sum(self.parts)[:m, : self.n], self.row_scale[: self.n], None, self.dtype)
        return y.reshape(self.shape)


def mgpu_linear(
    x2: jax.Array,
    layout: KernelLayout,
    mx: bool,
    bias: jax.Array | None,
    out_dtype: jnp.dtype,
    cfg=None,
    prefetch: Fp4LinearParams | None = None,
    defer: bool = False,
) -> jax.Array | SplitKSum:
    """``x2 @ (Q*S).T * alpha + bias`` ``(M, N)`` in ``out_dtype`` by the Mosaic GPU kernel, with
    ``alpha * 2**c`` the layout's ``row_scale``; ``x2`` bf16 ``(M, K)``; ``cfg`` defaults to
    :func:`choose_mgpu_config`. With one K split the epilogue runs in the kernel (no operation
    before it unless there is a bias), else on its float32 split-K partials (one XLA fusion,
    :func:`split_sum`), or, with ``defer`` and no bias, not here: the partials come back as a
    :class:`SplitKSum` (``lead`` ``(M,)``) for the consumer to sum.
    ``prefetch``: the layer that runs next, whose first weight tiles the kernel asks into L2 as
    it finishes (:func:`l2_prefetch_plan`; one-warpgroup configs; no effect on the result)."""
    from jaxfp4.kernels import w4a16_mgpu

    m = x2.shape[0]
    np_, kp = layout.padded_shape
    fmt = FP4Format.MXFP4 if mx else FP4Format.NVFP4
    cfg = cfg or choose_mgpu_config(m, np_, kp, fmt, jnp.dtype(out_dtype).itemsize)
    plan = None if prefetch is None or cfg.wgs != 1 else l2_prefetch_plan(m, prefetch)
    nxt = None if plan is None else prefetch.kernel_layout
    pf = dict(prefetch_plan=plan, prefetch=None if nxt is None else (nxt.codes, nxt.scales))
    # Token rows are not padded to the tile (the kernel's TMA copies fill rows past M with zeros),
    # only to what Mosaic GPU's tiling needs; K is padded to the layout's.
    mi = w4a16_mgpu.input_rows(m)
    xp = jnp.pad(x2, ((0, mi - m), (0, kp - x2.shape[1]))) if (mi, kp) != x2.shape else x2
    if cfg.split_k == 1 or cfg.cluster:
        b = None if bias is None else jnp.pad(bias.astype(jnp.float32), (0, np_ - layout.n))
        rows = w4a16_mgpu.epilogue_rows(layout.row_scale, b)
        y = w4a16_mgpu.fp4_matmul_fused_mgpu(
            xp, layout.codes, layout.scales, rows, cfg=cfg, mx=mx, out_dtype=out_dtype, **pf
        )
        return y[:m, : layout.n]
    parts = w4a16_mgpu.fp4_matmul_partials_mgpu(xp, layout.codes, layout.scales, cfg=cfg, mx=mx, **pf)
    if defer and bias is None:
        return SplitKSum(parts, layout.row_scale, (m,), layout.n, jnp.dtype(out_dtype))
    return _epilogue(split_sum(parts)[:m, : layout.n], layout.row_scale[: layout.n], bias, out_dtype)


def _epilogue(y: jax.Array, alpha: jax.Array | None, bias: jax.Array | None, out_dtype: jnp.dtype) -> jax.Array:
    """float32 ``y (M, N)`` times the row multipliers ``alpha`` (``(N,)``, a scalar, or None for
    none), plus ``bias``, in ``out_dtype``."""
    if alpha is not None:
        y = y * alpha
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def _triton_matmul(x2: jax.Array, w, acts: str) -> jax.Array:
    """float32 ``x2 @ (Q*S).T`` ``(M, N)`` (before the global multiplier) by the Triton kernels;
    ``x2`` bf16, or FP8 codes when ``acts == "fp8"``."""
    from jaxfp4.kernels.w4a8_triton import mxfp4_fp8_matmul_partials
    from jaxfp4.kernels.w4a16_triton import epilogue_exponent, fp4_matmul_partials

    m = x2.shape[0]
    mx = w.format is FP4Format.MXFP4
    cfg = choose_config(m, w.n, w.k, w.format, acts)
    if acts == "fp8" and cfg.dequant != "fp8":
        x2 = codecs.decode_e4m3(x2).astype(jnp.bfloat16)  # exact; from the bits (see decode_e4m3)
    mp = -(-m // cfg.bm) * cfg.bm
    np_ = -(-w.n // cfg.bn) * cfg.bn
    kq = cfg.bk * cfg.split_k
    kp = -(-w.k // kq) * kq
    bs = w.block_size
    codes, scales = w.codes, w.scales
    if (np_, kp) != (w.n, w.k):
        codes = jnp.pad(codes, ((0, np_ - w.n), (0, (kp - w.k) // 2)))
        scales = jnp.pad(scales, ((0, np_ - w.n), (0, (kp - w.k) // bs)))
    x2 = jnp.pad(x2, ((0, mp - m), (0, kp - w.k))) if (mp, kp) != (m, w.k) else x2
    if cfg.dequant == "fp8":
        parts = mxfp4_fp8_matmul_partials(x2, codes, scales, cfg=cfg, interpret=_interpret)
    else:
        parts = fp4_matmul_partials(x2, codes, scales, cfg=cfg, mx=mx, interpret=_interpret)
    return parts.sum(0)[:m, : w.n] * jnp.float32(2.0 ** epilogue_exponent(cfg, mx))  # exact: a power of two


# Rows from which W4A8's activations for the Mosaic GPU kernel come from one Pallas kernel
# (:func:`~jaxfp4.kernels.act_triton.fp8_static_values`) rather than XLA's fusions of the same
# arithmetic. Measured on the H100 by CUPTI (kernels/results/gemm-*.json runs K and L, layer time
# of W4A8, XLA -> kernel): M = 128 44.9 -> 41.5 us (K = 14336), 44.3 -> 41.8 (8192), 33.0 -> 33.5
# (4096); M = 1 and 16 1.0-1.6 us slower (e.g. 18.7 -> 19.7, 19.4 -> 20.3), where XLA's
# quantize-and-decode is one small fusion and the kernel's launch costs more.
FP8_ACT_KERNEL_MIN_M = 128


def forward(
    x: jax.Array,
    params: Fp4LinearParams,
    bias: jax.Array | None,
    out_dtype: jnp.dtype,
    prefetch: Fp4LinearParams | None = None,
    defer: bool = False,
) -> jax.Array | SplitKSum:
    """The backend's :func:`~jaxfp4.fp4_linear` (same arguments); ``defer``: where the Mosaic
    GPU kernel splits K and there is no bias, the partials unsummed (:class:`SplitKSum`, for
    :func:`~jaxfp4.ops.fp4_linear_deferred`)."""
    w = params.weight
    r = params.recipe
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    acts = "fp8" if isinstance(r, MXFP4W4A8) else "bf16"
    if isinstance(r, NVFP4W4A4):
        if r.activation_mode is ActivationQuant.VLLM:  # one kernel, bit-identical to the reference's
            x2 = fake_quantize_nvfp4_vllm(x2, params.input_scale, interpret=_interpret)
        else:
            x2 = fake_quantize_nvfp4_activations(x2, params.input_scale, mode=r.activation_mode)
    m, ob = x2.shape[0], jnp.dtype(out_dtype).itemsize
    # (This backend runs only on a GPU or in interpret mode.) W4A8: the static activation scale
    # goes to the epilogue; the Mosaic GPU kernel takes the FP8 codes' values as bf16 (exact), the
    # other paths the codes.
    if uses_mgpu(params, m, acts, ob):
        if acts == "fp8" and m >= FP8_ACT_KERNEL_MIN_M:  # one kernel
            x2 = fp8_static_values(x2, params.input_scale, interpret=_interpret)
        elif acts == "fp8":
            x2 = codecs.decode_e4m3(quantize_fp8_static(x2, params.input_scale)).astype(jnp.bfloat16)
        mx = w.format is FP4Format.MXFP4
        y = mgpu_linear(x2, params.kernel_layout, mx, bias, out_dtype, prefetch=prefetch, defer=defer)
        if isinstance(y, SplitKSum):
            return dataclasses.replace(y, lead=tuple(lead))
    else:
        x2 = quantize_fp8_static(x2, params.input_scale) if acts == "fp8" else x2
        if uses_dense(m, acts, params, ob):
            y = dense_forward(x2, params, acts, bias, out_dtype)
        else:
            y = _epilogue(_triton_matmul(x2, w, acts), _kernel_alpha(params), bias, out_dtype)
    return y.reshape(*lead, w.n)
