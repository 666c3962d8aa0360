"""Prefill-path probe (run on the GPU machine): at large M, is "expand the FP4 weight once, then
XLA's tensor-core GEMM" (``pallas.dense_forward``) faster than the Mosaic GPU kernel, and from
which M on?

For each K x N and M, the GPU time per layer by CUPTI (the sum of every kernel launched; ``COPIES``
distinct weights inside one jit, so weights stream from HBM), through ``fp4_linear``'s "pallas"
backend on prepared weights with ``DENSE_MIN_M`` forced each way:

* ``bf16``: the bf16 dot (the baseline, same run);
* ``<scheme>/mgpu``: the Mosaic GPU kernel (W4A8: on the exact FP8 values in bf16);
* ``<scheme>/dense``: the expand-then-GEMM path (W4A16: the reference's bf16 weight and a bf16
  GEMM; W4A8: the exact E4M3 weight and an FP8 GEMM);
* once per shape, the expansions alone: ``dequant`` (``dequantize`` to bf16) and ``e4m3``
  (``mxfp4_as_e4m3``).

At the end, an FP8 E4M3 x E4M3 dot's error against the exact float64 product (max |err| over
the sum of |products|; Hopper's FP8 MMA keeps fewer accumulator bits unless promoted), XLA's
default precision and HIGHEST.

Writes ``$OUT/prefill-probe-<device>.json``.

    PYTHONPATH=. python kernels/probe_prefill.py [--ms 256,512,1024,4096] [--shapes 4096x14336]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, NVFP4W4A16, FP4Format, mxfp4_as_e4m3
from jaxfp4.ops import pallas
from kernels.bench_gemm import COPIES, bf16_dot, gpu_us, random_weight

SCHEMES = {"nvfp4_w4a16": (FP4Format.NVFP4, NVFP4W4A16(), None), "mxfp4_w4a8": (FP4Format.MXFP4, MXFP4W4A8(), 0.02)}


def forced(dense_from: int):
    """``fp4_linear(backend="pallas")`` with the dense path from ``dense_from`` rows on."""

    def op(x, p):
        saved = pallas.DENSE_MIN_M
        pallas.DENSE_MIN_M = {"bf16": dense_from, "fp8": dense_from}
        try:
            return jaxfp4.fp4_linear(x, p, backend="pallas")
        finally:
            pallas.DENSE_MIN_M = saved

    return op


def fp8_error(m: int, k: int, n: int, precision) -> float:
    """Max |FP8 dot - exact| / sum|products| over the outputs, for random E4M3 operands."""
    kx, kw = jax.random.split(jax.random.key(m + n))
    x8 = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.float8_e4m3fn)
    w8 = jax.random.normal(kw, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    y = jnp.dot(x8, w8.T, preferred_element_type=jnp.float32, precision=precision)
    xs, ws = np.asarray(x8.astype(jnp.float32), np.float64), np.asarray(w8.astype(jnp.float32), np.float64)
    exact = xs @ ws.T
    mag = np.abs(xs) @ np.abs(ws).T
    return float(np.max(np.abs(np.asarray(y, np.float64) - exact) / np.maximum(mag, 1e-30)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="256,512,1024,4096")
    ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x8192")
    args = ap.parse_args()
    out = os.environ.get("OUT", ".")
    device = jax.devices()[0].device_kind
    print("device", device, "jax", jax.__version__, flush=True)
    records: list[dict] = []
    key = jax.random.key(0)
    path = f"{out}/prefill-probe-{device.replace(' ', '_')}.json"
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
        params = {}
        for scheme, (fmt, recipe, scale) in SCHEMES.items():
            qs = [random_weight(jax.random.fold_in(key, 100 + i), n, k, fmt) for i in range(COPIES)]
            params[scheme] = [jaxfp4.prepare_weights(jaxfp4.make_params(q, recipe, input_scale=scale)) for q in qs]
        expansions = {
            "dequant": (lambda x, p: jaxfp4.dequantize(p, jnp.bfloat16), params["nvfp4_w4a16"]),
            "e4m3": (lambda x, p: mxfp4_as_e4m3(p.weight), params["mxfp4_w4a8"]),
        }
        for name, (op, ps) in expansions.items():
            _, us = gpu_us(op, None, ps)
            records.append(dict(M=0, K=k, N=n, backend=name, us=us))
            print(f"K={k:5d} N={n:5d} {name} {us:7.1f} us", flush=True)
        for m in (int(v) for v in args.ms.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            rec = dict(M=m, K=k, N=n)
            ops = {"bf16": (bf16_dot, wb)}
            for scheme, ps in params.items():
                ops[f"{scheme}/mgpu"] = (forced(1 << 40), ps)
                ops[f"{scheme}/dense"] = (forced(1), ps)
            times = {}
            for name, (op, ws) in ops.items():
                try:
                    _, us = gpu_us(op, x, ws)
                except Exception as e:  # recorded, not fatal: the probe asks what works
                    print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                times[name] = us
                records.append({**rec, "backend": name, "us": us})
            print(
                f"M={m:5d} K={k:5d} N={n:5d} "
                + " ".join(f"{b} {t:7.1f}" for b, t in times.items())
                + "  | vs bf16: "
                + " ".join(f"{b} {times['bf16'] / t:.2f}x" for b, t in times.items() if b != "bf16"),
                flush=True,
            )
            with open(path, "w") as f:
                json.dump({"device": device, "jax": jax.__version__, "copies": COPIES, "records": records}, f, indent=1)
        del wb, params
    errs = {}
    for prec in ("DEFAULT", "HIGHEST"):
        try:
            errs[prec] = fp8_error(256, 8192, 512, getattr(jax.lax.Precision, prec))
        except Exception as e:
            errs[prec] = f"{type(e).__name__}: {str(e)[:200]}"
    print("fp8 dot max error / sum|products| (M=256, K=8192, N=512):", errs, flush=True)
    with open(path, "w") as f:
        json.dump(
            {"device": device, "jax": jax.__version__, "copies": COPIES, "records": records, "fp8_error": errs}, f, indent=1
        )


if __name__ == "__main__":
    main()
