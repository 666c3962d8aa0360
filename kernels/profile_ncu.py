"""Nsight Compute view of single FP4 layers (run on the GPU machine under ``ncu``; the kernel lab).

Each variant is one jitted ``mgpu_linear`` call on one weight (and, with ``--bf16``, the bf16 dot
of the same shape), compiled and run once, then run once more: ncu selects the second round's
Mosaic GPU launches with ``-k regex:mosaic --launch-skip N --launch-count N`` (N variants; the
bf16 dots need a ``-k`` that matches their kernels too). ncu's
default cache control flushes the caches before each replay pass, so the weights come from HBM
as in a real decode step. What it answers that the CUPTI timings cannot: DRAM throughput against
peak, issue-slot use, and why warps stall. (Bracketing the second round with
``cudaProfilerStart``/``Stop`` through PyTorch's runtime ended in a segmentation fault under ncu
on the H100, 2026-11-24; this selection by name and count worked.)

    ncu --clock-control none --set full -k regex:mosaic --launch-skip 2 --launch-count 2 \\
        -o $OUT/prof python kernels/profile_ncu.py --variants nvfp4:1:4096x14336,nvfp4:1:4096x14336:skip
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from jaxfp4.formats import FP4Format
from jaxfp4.ops import pallas
from kernels.bench_gemm import random_weight
from kernels.probe_mgpu import layout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--variants",
        default="nvfp4:1:4096x14336",
        help="comma-separated format:M:KxN[:dequant][:wgs=G] (dequant: a MgpuConfig lab diagnostic)",
    )
    ap.add_argument("--bf16", action="store_true", help="also profile the bf16 dot of each shape")
    args = ap.parse_args()
    key = jax.random.key(0)
    calls = []
    for i, v in enumerate(args.variants.split(",")):
        fname, m, shape, *opts = v.split(":")
        m = int(m)
        k, n = map(int, shape.split("x"))
        fmt = FP4Format(fname)
        mx = fmt is FP4Format.MXFP4
        lay = layout(random_weight(jax.random.fold_in(key, i), n, k, fmt))
        cfg = pallas.choose_mgpu_config(m, n, k, fmt)
        for o in opts:
            cfg = dataclasses.replace(cfg, wgs=int(o[4:])) if o.startswith("wgs=") else dataclasses.replace(cfg, dequant=o)
        x = jax.random.normal(jax.random.fold_in(key, 1000 + i), (m, k), jnp.bfloat16)
        f = jax.jit(lambda x, kl, cfg=cfg, mx=mx: pallas.mgpu_linear(x, kl, mx, None, jnp.bfloat16, cfg))
        print(f"variant {i}: {v} -> {cfg}", flush=True)
        calls.append((f, x, lay))
        if args.bf16:
            w = jax.random.normal(jax.random.fold_in(key, 2000 + i), (n, k), jnp.bfloat16)
            g = jax.jit(lambda x, w: jnp.dot(x, w.T))
            print(f"variant {i}b: bf16 dot M={m} K={k} N={n}", flush=True)
            calls.append((g, x, w))
    for _ in range(2):  # the first round compiles (and autotunes); ncu skips its launches
        for f, *a in calls:
            jax.block_until_ready(f(*a))


if __name__ == "__main__":
    main()
