"""Nsight Compute view of single FP4 layers (run on the GPU machine under ``ncu``; the kernel lab).

Each variant is one jitted ``mgpu_linear`` call on one weight (and the bf16 dot of the same shape),
compiled and run once before profiling starts, then run once between ``cudaProfilerStart`` and
``cudaProfilerStop`` so that ncu (``--profile-from-start off``) sees exactly those launches and
not XLA's compile-time autotuning. ncu's default cache control flushes the caches before each
replay pass, so the weights come from HBM as in a real decode step. What it answers that the
CUPTI timings cannot: DRAM throughput against peak, issue-slot use, and why warps stall.

    ncu --profile-from-start off --clock-control none --set full -o $OUT/prof \\
        python kernels/profile_ncu.py --variants nvfp4:1:4096x14336,nvfp4:1:4096x14336:skip
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses

import jax
import jax.numpy as jnp

from jaxfp4.formats import FP4Format
from jaxfp4.ops import pallas
from kernels.bench_gemm import random_weight
from kernels.probe_mgpu import layout


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime that PyTorch loads (the device machine's image has it) or any on the path."""
    try:
        import torch

        torch.cuda.init()
        return torch.cuda.cudart()
    except Exception:  # fall back to the system runtime library
        return ctypes.CDLL("libcudart.so")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--variants",
        default="nvfp4:1:4096x14336",
        help="comma-separated format:M:KxN[:dequant][:wgs=G] (dequant: a MgpuConfig lab diagnostic)",
    )
    ap.add_argument("--bf16", action="store_true", help="also profile the bf16 dot of each shape")
    ap.add_argument(
        "--no-range",
        action="store_true",
        help="no cudaProfilerStart/Stop (select the launches with ncu's -k / --launch-skip instead)",
    )
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
    for f, *a in calls:  # compile (and autotune) outside the profiled range
        jax.block_until_ready(f(*a))
    rt = None if args.no_range else _cudart()
    if rt is not None:
        rt.cudaProfilerStart()
    for f, *a in calls:
        jax.block_until_ready(f(*a))
    if rt is not None:
        rt.cudaProfilerStop()


if __name__ == "__main__":
    main()
