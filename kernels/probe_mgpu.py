"""Mosaic GPU W4A16 decode kernel: correctness against an exact float64 product, then per-layer
timings next to the bf16 dot and the Triton kernel (same run, same method as bench_gemm.py).

Run on the GPU machine: ``python kernels/probe_mgpu.py``; writes ``$OUT/mgpu-probe-<device>.json``.
``PROBE_TIMING=0`` skips the timings.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jaxfp4
from jaxfp4.formats import MXFP4W4A16, NVFP4W4A16, FP4Format, GlobalScale, QuantizedTensor
from jaxfp4.kernels import w4a16_mgpu as K
from jaxfp4.ops import KernelLayout
from jaxfp4.ops.pallas import mgpu_linear
from kernels.bench_gemm import bf16_dot, gpu_us, time_op

COPIES = 16


def weight(key, n, k, fmt):
    k1, k2 = jax.random.split(key)
    codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    if fmt is FP4Format.NVFP4:
        sb = jax.random.randint(k2, (n, k // 16), 0x01, 0x7F, jnp.int32).astype(jnp.uint8)  # incl. subnormals
        return QuantizedTensor(
            codes,
            jax.lax.bitcast_convert_type(sb, jnp.float8_e4m3fn),
            jnp.array([1.0], jnp.float32),
            fmt,
            (n, k),
            (n,),
            GlobalScale.MULTIPLIER,
        )
    sc = jax.random.randint(k2, (n, k // 32), 110, 136, jnp.int32).astype(jnp.uint8)
    return QuantizedTensor(codes, sc, None, fmt, (n, k), (n,), GlobalScale.NONE)


def layout(q: QuantizedTensor) -> KernelLayout:
    """The load-time layout of the kernel (what prepare_weights adds to a layer's params)."""
    recipe = MXFP4W4A16() if q.format is FP4Format.MXFP4 else NVFP4W4A16()
    return jaxfp4.prepare_weights(jaxfp4.make_params(q, recipe)).kernel_layout


def exact_ref(x, q):
    w = np.asarray(jaxfp4.dequantize(q, dtype=jnp.float32), np.float64)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    return xf @ w.T, np.abs(xf) @ np.abs(w).T


def check(records):
    key = jax.random.key(1)
    for fmt in (FP4Format.NVFP4, FP4Format.MXFP4):
        mx = fmt is FP4Format.MXFP4
        for m, n, k, cfg in [
            (1, 64, 512, K.MgpuConfig(512, 1, 2)),
            (5, 128, 1024, K.MgpuConfig(256, 2, 2)),
            (16, 192, 2048, K.MgpuConfig(512, 2, 4)),
            (37, 256, 1024, K.MgpuConfig(128, 1, 3)),
        ]:
            q = weight(jax.random.fold_in(key, m), n, k, fmt)
            x = jax.random.normal(jax.random.fold_in(key, 1000 + m), (m, k), jnp.bfloat16)
            try:
                y32 = mgpu_linear(x, layout(q), mx, None, jnp.float32, cfg)  # float32, for the re-association bound
                y = np.asarray(y32.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
                y32 = np.asarray(y32, np.float64)
                ref, mag = exact_ref(x, q)
                err = float(np.max(np.abs(y32 - ref) / np.maximum(mag, 1e-30)))
                err_bf16 = float(np.max(np.abs(y - ref) / np.maximum(np.abs(ref), 1e-30) * (np.abs(ref) > 1e-3 * mag)))
                ok = err < k * 2.0**-24  # float32 summation bound (K-1)u relative to sum|products|
                verdict = "OK" if ok else "FAIL"
                print(
                    f"check {fmt.value} M={m} N={n} K={k} {cfg}: err/sum|p| {err:.2e} bf16 {err_bf16:.2e} {verdict}",
                    flush=True,
                )
                records.append(dict(kind="check", fmt=fmt.value, M=m, N=n, K=k, cfg=str(cfg), err=err, ok=ok))
            except Exception as e:
                traceback.print_exc()
                records.append(
                    dict(
                        kind="check", fmt=fmt.value, M=m, N=n, K=k, cfg=str(cfg), error=f"{type(e).__name__}: {str(e)[:300]}"
                    )
                )


def timing(records, budget_s=300.0):
    t0 = time.time()
    key = jax.random.key(0)
    for k, n in [(4096, 14336), (14336, 4096), (8192, 8192)]:
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
        for fmt, recipe in ((FP4Format.NVFP4, NVFP4W4A16()), (FP4Format.MXFP4, MXFP4W4A16())):
            mx = fmt is FP4Format.MXFP4
            qs = [weight(jax.random.fold_in(key, 100 + i), n, k, fmt) for i in range(COPIES)]
            layouts = [layout(q) for q in qs]
            params = [jaxfp4.make_params(q, recipe) for q in qs]  # no kernel layout: the Triton kernel
            for m in (1, 16) if not mx else (1,):
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                bf16 = time_op(bf16_dot, x, wb)
                tri = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"), x, params)
                rec = dict(kind="time", fmt=fmt.value, M=m, K=k, N=n, bf16_us=bf16, triton_us=tri, mgpu={})
                for bk in (256, 512, 1024):
                    for split in (1, 2, 4):
                        for stages in (3, 6):
                            if time.time() - t0 > budget_s or k % (bk * split) or k // (bk * split) < 2:
                                continue
                            cfg = K.MgpuConfig(bk, split, stages)
                            try:
                                us = time_op(
                                    lambda x, kl, cfg=cfg, mx=mx: mgpu_linear(x, kl, mx, None, x.dtype, cfg),
                                    x,
                                    layouts,
                                )
                            except Exception as e:
                                print("  failed", cfg, type(e).__name__, str(e)[:300], flush=True)
                                continue
                            rec["mgpu"][str(cfg)] = us
                            print(f"  {fmt.value} M={m} K={k} N={n} {cfg}: {us:.1f} us ({bf16 / us:.2f}x bf16)", flush=True)
                best = min(rec["mgpu"].values(), default=float("nan"))
                head = f"{fmt.value} M={m} K={k} N={n}: bf16 {bf16:.1f} triton {tri:.1f} ({bf16 / tri:.2f}x)"
                print(f"{head} mgpu best {best:.1f} ({bf16 / best:.2f}x)", flush=True)
                records.append(rec)
            del qs, layouts, params


def main():
    out = os.environ.get("OUT", ".")
    dev = jax.devices()[0].device_kind
    print("device", dev, "jax", jax.__version__, flush=True)
    records = []
    if os.environ.get("PROBE_CUPTI") == "1":
        cupti_breakdown(out, dev)
        return
    check(records)
    path = f"{out}/mgpu-probe-{dev.replace(' ', '_')}.json"
    if os.environ.get("PROBE_TIMING", "1") == "1" and all(r.get("ok") for r in records):
        timing(records, float(os.environ.get("PROBE_BUDGET_S", "300")))
    _save(path, {"device": dev, "jax": jax.__version__, "copies": COPIES, "records": records})


def _save(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def cupti_breakdown(out: str, dev: str) -> None:
    """Per-kernel GPU time (CUPTI) of the Mosaic kernel over COPIES distinct weights, with and
    without the expansion math, next to the bf16 dot's kernel time; writes mgpu-cupti-<dev>.json."""
    key = jax.random.key(0)
    rows = []
    for k, n, m, fmt in [
        (4096, 14336, 1, FP4Format.NVFP4),
        (8192, 8192, 16, FP4Format.NVFP4),
        (14336, 4096, 1, FP4Format.MXFP4),
    ]:
        mx = fmt is FP4Format.MXFP4
        qs = [weight(jax.random.fold_in(key, 100 + i), n, k, fmt) for i in range(COPIES)]
        layouts = [layout(q) for q in qs]
        del qs
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
        x = jax.random.normal(key, (K.token_tile(m), k), jnp.bfloat16)
        _, bf16 = gpu_us(lambda x, w: jnp.dot(x, w.T), x, wb)
        del wb
        for bk, split, stages in [(512, 1, 3), (512, 2, 3), (256, 2, 4), (512, 2, 4), (256, 4, 4), (512, 4, 3)]:
            for dq in ("ptx", "none"):
                cfg = K.MgpuConfig(bk, split, stages, dq)
                if k % (bk * split):
                    continue
                try:
                    _, us = gpu_us(
                        lambda x, w, cfg=cfg, mx=mx: K.fp4_matmul_partials_mgpu(x, w.codes, w.scales, cfg=cfg, mx=mx),
                        x,
                        layouts,
                    )
                except Exception as e:
                    print("  failed", cfg, type(e).__name__, str(e)[:200], flush=True)
                    continue
                gbs = n * k * (0.5 + (1 / 32 if mx else 1 / 16)) / (us * 1e-6) / 1e9
                head = f"cupti {fmt.value} M={m} K={k} N={n} {cfg}: kernel {us:.1f} us ({gbs:.0f} GB/s)"
                print(f"{head}, bf16 dot kernel {bf16:.1f} us ({bf16 / us:.2f}x)", flush=True)
                rows.append(
                    dict(fmt=fmt.value, M=m, K=k, N=n, cfg=str(cfg), kernel_us=us, bf16_kernel_us=bf16, weight_GBps=gbs)
                )
        del layouts
    _save(
        f"{out}/mgpu-cupti-{dev.replace(' ', '_')}.json",
        {"device": dev, "jax": jax.__version__, "copies": COPIES, "rows": rows},
    )


if __name__ == "__main__":
    main()
