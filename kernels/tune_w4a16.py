"""Variant sweep for the W4A16 Triton kernel (run on the GPU machine; the kernel lab's notebook).

Times every candidate :class:`BlockConfig` (orientation ``swap``, E2M1 expansion ``dequant``,
tiles, split-K, warps, stages) on the given shapes with the method of ``bench_gemm.py``
(16 distinct weights inside one jit, bf16 dot measured in the same run), and writes
``$OUT/tune-<device>.json`` with every record, so that the choice of defaults is traceable.

Usage: ``python kernels/tune_w4a16.py [--shapes 4096x14336,...] [--ms 1,16,128,4096] [--formats nvfp4,mxfp4]``
``--scheme w4a8`` sweeps the MXFP4 x FP8 kernel (``dequant="fp8"``) for MXFP4 W4A8 instead, with the
W4A16 kernel's heuristic config on the exact FP8 values as the first candidate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp

import jaxfp4
from jaxfp4.formats import MXFP4W4A8, MXFP4W4A16, NVFP4W4A16, FP4Format
from jaxfp4.kernels.w4a16_triton import BlockConfig
from jaxfp4.ops import pallas as pallas_backend
from kernels.bench_gemm import COPIES, bf16_dot, fp8_candidates, random_weight, time_op


def candidates(m: int, n: int, k: int, dequants: list[str], swaps: list[bool]) -> list[BlockConfig]:
    split = pallas_backend.default_split
    out = []
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        tiles = [(64, 256, 4, 3), (128, 256, 4, 3), (128, 512, 8, 3), (64, 512, 4, 4)]
        for (bn, bk, warps, stages), dq, swap in itertools.product(tiles, dequants, swaps):
            out.append(BlockConfig(bm, bn, bk, split(n, k, bn, bk), warps, stages, swap, dq))
    elif m <= 256:
        tiles = [(128, 128, 64, 8, 3), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3)]
        for (bm, bn, bk, warps, stages), dq, swap in itertools.product(tiles, dequants, swaps):
            out.append(BlockConfig(bm, bn, bk, split(n, k, bn, bk, 132), warps, stages, swap, dq))
    else:
        tiles = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
        for (bm, bn, bk, warps, stages), dq, swap in itertools.product(tiles, dequants, swaps):
            out.append(BlockConfig(bm, bn, bk, 1, warps, stages, swap, dq))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336")
    ap.add_argument("--ms", default="1,16,128,4096")
    ap.add_argument("--formats", default="nvfp4")
    ap.add_argument("--dequants", default="f32,bits,asm")
    ap.add_argument("--swaps", default="0,1")
    ap.add_argument("--scheme", default="w4a16", choices=("w4a16", "w4a8"))
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("TUNE_BUDGET_S", "420")))
    args = ap.parse_args()
    out = os.environ.get("OUT", ".")
    device = jax.devices()[0].device_kind
    print("device", device, "jax", jax.__version__, flush=True)
    t0 = time.time()
    records = []
    key = jax.random.key(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
        for fmt_name in args.formats.split(","):
            fmt = FP4Format(fmt_name)
            recipe = NVFP4W4A16() if fmt is FP4Format.NVFP4 else MXFP4W4A16()
            acts, scale = "bf16", None
            if args.scheme == "w4a8":
                fmt, recipe, acts, scale = FP4Format.MXFP4, MXFP4W4A8(), "fp8", 0.02
            qs = [random_weight(jax.random.fold_in(key, 100 + i), n, k, fmt) for i in range(COPIES)]
            ps = [jaxfp4.make_params(q, recipe, input_scale=scale) for q in qs]
            for m in (int(v) for v in args.ms.split(",")):
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                bf16 = time_op(bf16_dot, x, wb)
                ref = jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p, backend="xla"))(x, ps[0])
                print(f"== {fmt_name} M={m} K={k} N={n}: bf16 {bf16:.1f} us", flush=True)
                swaps = [bool(int(v)) for v in args.swaps.split(",")]
                cands = fp8_candidates(m, n, k) if acts == "fp8" else candidates(m, n, k, args.dequants.split(","), swaps)
                for cfg in cands:
                    if time.time() - t0 > args.budget_s:
                        print("budget spent; stopping", flush=True)
                        break
                    rec = dict(format=fmt_name, scheme=args.scheme, M=m, K=k, N=n, bf16_us=bf16, config=cfg.__dict__)
                    try:
                        with pallas_backend.tuned_override([pallas_backend.tuned_entry(m, n, k, fmt, cfg, acts)]):
                            y = jax.jit(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"))(x, ps[0])
                            us = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"), x, ps)
                        err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))))
                        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
                        rec.update(us=us, speedup=bf16 / us, max_err_rel=err / scale)
                        print(f"  {us:7.1f} us {bf16 / us:5.2f}x err {err / scale:.1e}  {cfg}", flush=True)
                    except Exception as e:  # a variant that fails to compile is recorded, not fatal
                        rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                        print("  FAILED", cfg, rec["error"][:200], flush=True)
                    records.append(rec)
    safe = device.replace(" ", "_")
    with open(f"{out}/tune-{args.scheme}-{safe}.json", "w") as f:
        json.dump({"device": device, "jax": jax.__version__, "copies": COPIES, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
