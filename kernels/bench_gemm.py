"""GEMM benchmark + small tuning sweep for the FP4 kernels, all four schemes (run on the GPU machine).

Timing method (research/performance.md addendum): inside one ``jax.jit`` the op is applied to
``COPIES`` *distinct* weights (separate buffers, unrolled) and the outputs are summed, so neither
Python dispatch (~37 us a call) nor L2 hits (a 33 MB FP4 weight fits the 50 MB L2) are timed;
time per layer = median wall time of the whole jitted call / ``COPIES``. The bf16 baseline is
measured the same way in the same run.

Schemes: ``nvfp4_w4a16``, ``mxfp4_w4a16``, ``nvfp4_w4a4`` (the NVFP4 activation quantization runs
just before the W4A16 kernel and is timed with it), ``mxfp4_w4a8`` (FP8 activation quantization,
then the W4A16 kernel on the exact FP8 values; the Triton FP8 kernel is among the swept Triton
configs). The "xla" backend is jnp quantize-dequantize then a dot.

Weights go through ``prepare_weights`` (as a model loader would), so "pallas" runs the Mosaic GPU
kernel; the Triton kernel on the same weights without the layout is recorded as
``pallas_triton`` (``BENCH_COMPARE_TRITON=0`` skips it). ``BENCH_SCHEMES`` picks a subset of
schemes; ``BENCH_SWEEP`` names the schemes whose Triton configs are swept (others run the tuned or
heuristic config); ``BENCH_BUDGET_S`` caps the sweeping time; ``BENCH_MS`` picks the row counts
(default ``1,16,128,4096``), ``BENCH_SHAPES`` the K x N shapes.

``BENCH_TIMER=cupti`` times GPU work instead of wall time: the sum of every kernel the layer
launches, by CUPTI (``gpu_us``; no launch gaps, no dispatch), per layer over the same distinct
weights; records then carry ``"timer": "cupti"``. ``BENCH_XLA=0`` skips the "xla" backend.

Writes ``$OUT/gemm-<device>.json`` ({"device", "records": [{scheme, M, K, N, backend, us}]}),
``$OUT/configs-<device>.json`` (best config per shape, for jaxfp4/kernels/configs/) and a PNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, MXFP4W4A16, NVFP4W4A4, NVFP4W4A16, FP4Format, GlobalScale, QuantizedTensor
from jaxfp4.kernels.w4a16_triton import BlockConfig
from jaxfp4.ops import pallas as pallas_backend

COPIES = 16
SHAPES = [  # (K, N); BENCH_SHAPES="4096x14336,..." picks a subset
    tuple(int(d) for d in v.split("x")) for v in os.environ.get("BENCH_SHAPES", "4096x14336,14336x4096,8192x8192").split(",")
]
MS = [int(v) for v in os.environ.get("BENCH_MS", "1,16,128,4096").split(",")]
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "400"))
# scheme -> (weight format, recipe, static activation scale: W4A4 divisor / W4A8 multiplier)
SCHEMES = {
    "nvfp4_w4a16": (FP4Format.NVFP4, NVFP4W4A16(), None),
    "mxfp4_w4a16": (FP4Format.MXFP4, MXFP4W4A16(), None),
    "nvfp4_w4a4": (FP4Format.NVFP4, NVFP4W4A4(), 336.0),
    "mxfp4_w4a8": (FP4Format.MXFP4, MXFP4W4A8(), 0.02),
}
RUN = [v for v in os.environ.get("BENCH_SCHEMES", ",".join(SCHEMES)).split(",") if v]
SWEEP = [v for v in os.environ.get("BENCH_SWEEP", "nvfp4_w4a16,mxfp4_w4a16").split(",") if v]
COMPARE_TRITON = os.environ.get("BENCH_COMPARE_TRITON", "1") == "1"
TIMER = os.environ.get("BENCH_TIMER", "wall")
RUN_XLA = os.environ.get("BENCH_XLA", "1") == "1"


def random_weight(key, n: int, k: int, fmt: FP4Format) -> QuantizedTensor:
    k1, k2 = jax.random.split(key)
    codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    if fmt is FP4Format.NVFP4:
        sb = jax.random.randint(k2, (n, k // 16), 0x20, 0x50, jnp.int32).astype(jnp.uint8)
        scales = jax.lax.bitcast_convert_type(sb, jnp.float8_e4m3fn)
        return QuantizedTensor(codes, scales, jnp.array([3e-4], jnp.float32), fmt, (n, k), (n,), GlobalScale.MULTIPLIER)
    scales = jax.random.randint(k2, (n, k // 32), 118, 124, jnp.int32).astype(jnp.uint8)
    return QuantizedTensor(codes, scales, None, fmt, (n, k), (n,), GlobalScale.NONE)


def bf16_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """The baseline every lab script measures in the same run: ``x @ w.T`` of bf16 operands,
    float32 accumulation, rounded to ``x``'s dtype."""
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def time_op(op, x, ws, reps: int = 7) -> float:
    """us per layer of ``op`` over the distinct weights ``ws``: the median wall time of one jitted
    call over all of them (``BENCH_TIMER=cupti``: their summed kernel time, :func:`gpu_us`)."""
    if TIMER == "cupti":
        return gpu_us(op, x, ws)[1]
    f = jax.jit(lambda x, ws: sum(op(x, w).astype(jnp.float32).sum() for w in ws))
    f(x, ws).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x, ws).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) / len(ws) * 1e6


def gpu_us(op, x, ws) -> tuple[list, float]:
    """``[op(x, w) for w in ws]`` in one jit and the GPU time per layer in us: the sum of every
    kernel it launched, by CUPTI (no dispatch, no gaps between kernels; ``ws`` distinct weights,
    so no L2 hits)."""
    from jax.experimental.mosaic.gpu import profiler

    outs, t = profiler.measure(lambda x, ws: [op(x, w) for w in ws], aggregate=False)(x, ws)
    return outs, sum(ms for _, ms in t) * 1e3 / len(ws)


def candidates(m: int, n: int, k: int, fmt: FP4Format, scheme: str) -> list[BlockConfig]:
    """A short list per M bucket, from the variant sweep of ``tune_w4a16.py`` (tune-*.json):
    register-built bf16 nibbles (``bits``/``asm``) beat the float32 decode everywhere, the
    plain orientation beats ``swap`` at most shapes; M=1 also tries the CUDA-core GEMV."""
    split = pallas_backend.default_split
    if m == 1:
        cands = [
            BlockConfig(16, 128, 512, split(n, k, 128, 512), 8, 3, dequant="asm"),
            BlockConfig(1, 64, 256, split(n, k, 64, 256), 4, 3, dequant="asm", mma=False),
            BlockConfig(1, 128, 128, split(n, k, 128, 128), 4, 4, dequant="asm", mma=False),
        ]
    elif m <= 16:
        cands = [
            BlockConfig(16, 64, 256, split(n, k, 64, 256), 4, 3, dequant="bits"),
            BlockConfig(16, 64, 512, split(n, k, 64, 512), 4, 4, dequant="asm"),
            BlockConfig(16, 128, 512, split(n, k, 128, 512), 8, 3, dequant="asm"),
        ]
    elif m <= 256:
        cands = [
            BlockConfig(128, 64, 128, split(n, k, 64, 128, 132), 4, 3, dequant="bits"),
            BlockConfig(64, 128, 128, split(n, k, 128, 128, 132), 4, 3, dequant="asm"),
            BlockConfig(128, 64, 128, split(n, k, 64, 128, 132), 4, 3, dequant="asm"),
        ]
    else:
        cands = [
            BlockConfig(128, 128, 64, 1, 8, 3, dequant="bits"),
            BlockConfig(128, 256, 64, 1, 8, 3, dequant="asm"),
            BlockConfig(128, 128, 64, 1, 8, 3, dequant="asm"),
        ]
    if scheme == "mxfp4_w4a8":
        return fp8_candidates(m, n, k)
    return cands if fmt is FP4Format.NVFP4 else cands[:1]


def fp8_candidates(m: int, n: int, k: int) -> list[BlockConfig]:
    """MXFP4 W4A8: the W4A16 kernel's pick for this M (on the exact FP8 values), then FP8-kernel
    tiles (``bm >= 64``: smaller tiles would use sm_90's emulated FP8 ``mma.sync``)."""
    split = pallas_backend.default_split
    base = pallas_backend.choose_config(m, n, k, FP4Format.MXFP4, "bf16")
    tiles = FP8_TILES_DECODE if m <= 64 else FP8_TILES
    out = [base]
    for bm, bn, bk, warps, stages, swap in tiles:
        sp = split(n, k, bn, bk, 132) if m <= 256 else 1
        out.append(BlockConfig(bm, bn, bk, sp, warps, stages, swap, "fp8"))
    return out


# (bm, bn, bk, num_warps, num_stages, swap) for the FP8 kernel; kernels/tune_w4a16.py --scheme w4a8
FP8_TILES = [
    (128, 128, 128, 8, 3, False),
    (128, 256, 128, 8, 3, False),
    (128, 128, 64, 4, 4, False),
    (128, 128, 128, 4, 3, False),
    (256, 128, 128, 8, 3, False),
    (128, 128, 128, 8, 3, True),
    (64, 128, 128, 4, 3, False),
    (128, 64, 128, 4, 3, False),
]
FP8_TILES_DECODE = [(64, 64, 128, 4, 3, False), (64, 128, 128, 4, 3, False), (64, 128, 256, 4, 3, False)]


def main() -> None:
    out = os.environ.get("OUT", ".")
    dev = jax.devices()[0]
    device = dev.device_kind
    print("device", device, "jax", jax.__version__, flush=True)
    t_start = time.time()
    records, tuned = [], {}
    key = jax.random.key(0)
    for k, n in SHAPES:
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
        weights = {
            fmt: [random_weight(jax.random.fold_in(key, salt + i), n, k, fmt) for i in range(COPIES)]
            for fmt, salt in ((FP4Format.NVFP4, 100), (FP4Format.MXFP4, 200))
        }
        # prepare_weights: the load-time layout of the Mosaic GPU decode kernel (M <= 64)
        params = {
            scheme: [jaxfp4.prepare_weights(jaxfp4.make_params(q, recipe, input_scale=scale)) for q in weights[fmt]]
            for scheme, (fmt, recipe, scale) in SCHEMES.items()
            if scheme in RUN
        }
        for m in MS:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            bf16 = time_op(bf16_dot, x, wb)
            for scheme, ps in params.items():
                rec = dict(scheme=scheme, M=m, K=k, N=n, **({"timer": TIMER} if TIMER != "wall" else {}))
                records.append({**rec, "backend": "bf16", "us": bf16})
                xla = float("nan")
                if RUN_XLA:
                    xla = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="xla"), x, ps)
                    records.append({**rec, "backend": "xla", "us": xla})
                fmt = ps[0].weight.format
                acts = "fp8" if scheme == "mxfp4_w4a8" else "bf16"
                pal = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"), x, ps)
                if pallas_backend.uses_dense(m, acts, ps[0]):  # what actually ran
                    used = {"kernel": "dense", "gemm": f"cublas {acts}"}
                elif pallas_backend.uses_mgpu(ps[0], m, acts):
                    cfg = pallas_backend.choose_mgpu_config(m, *ps[0].kernel_layout.padded_shape, fmt)
                    used = {"kernel": "mgpu", **dataclasses.asdict(cfg)}
                else:
                    used = dataclasses.asdict(pallas_backend.choose_config(m, n, k, fmt, acts))
                records.append({**rec, "backend": "pallas", "us": pal, "config": used})
                # The Triton kernel on the same weights without the layout; its configs swept for SWEEP.
                sweep = scheme in SWEEP and time.time() - t_start < BUDGET_S
                if COMPARE_TRITON or sweep:
                    plain = [dataclasses.replace(p, kernel_layout=None) for p in ps]
                    best = None
                    for cfg in candidates(m, n, k, fmt, scheme) if sweep else [None]:
                        override = (
                            contextlib.nullcontext()
                            if cfg is None
                            else pallas_backend.tuned_override([pallas_backend.tuned_entry(m, n, k, fmt, cfg, acts)])
                        )
                        try:
                            with override:
                                us = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"), x, plain)
                        except Exception as e:  # a config that fails to compile is skipped, and said so
                            print("  config failed", cfg, type(e).__name__, str(e)[:200], flush=True)
                            continue
                        tried = cfg or pallas_backend.choose_config(m, n, k, fmt, acts)
                        print(f"  {scheme} M={m} K={k} N={n} triton {tried} -> {us:.1f} us", flush=True)
                        if best is None or us < best[0]:
                            best = (us, tried)
                    if best is not None:
                        records.append(
                            {**rec, "backend": "pallas_triton", "us": best[0], "config": dataclasses.asdict(best[1])}
                        )
                        if sweep:
                            entry = pallas_backend.tuned_entry(m, n, k, fmt, best[1], acts)
                            tuned.setdefault((entry["m_bucket"], n, k, fmt.value, acts), entry)
                print(
                    f"{scheme:12s} M={m:5d} K={k:5d} N={n:5d} bf16 {bf16:8.1f} xla {xla:8.1f} pallas {pal:8.1f}"
                    f"  speedup {bf16 / pal:.2f}x",
                    flush=True,
                )
        del wb, weights, params
        save(out, device, records, tuned)  # after every shape: a run cut short still leaves its data
    plot(records, device, f"{out}/gemm-{device.replace(' ', '_')}.png")


def save(out: str, device: str, records: list[dict], tuned: dict) -> None:
    safe = device.replace(" ", "_")
    with open(f"{out}/gemm-{safe}.json", "w") as f:
        json.dump({"device": device, "jax": jax.__version__, "copies": COPIES, "records": records}, f, indent=1)
    with open(f"{out}/configs-{safe}.json", "w") as f:
        json.dump({"device_kind": device, "configs": list(tuned.values())}, f, indent=1)


def plot(records, device, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    schemes = [s for s in SCHEMES if any(r["scheme"] == s for r in records)]
    fig, axes = plt.subplots(1, len(schemes), figsize=(6 * len(schemes), 4.5), squeeze=False)
    for ax, scheme in zip(axes[0], schemes, strict=True):
        for k, n in SHAPES:
            sp = []
            for m in MS:
                r = {x["backend"]: x["us"] for x in records if (x["scheme"], x["M"], x["K"], x["N"]) == (scheme, m, k, n)}
                sp.append(r["bf16"] / r["pallas"])
            ax.plot(MS, sp, marker="o", label=f"K={k} N={n}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows of activations)")
        ax.set_ylabel("speedup vs bf16 dot (same run)")
        ax.set_title(f"{scheme} pallas, {device}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
