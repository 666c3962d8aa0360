"""The add + RMSNorm kernel summing split-K partials itself, against XLA's sum and then the kernel.

At decode, o_proj's and down_proj's Mosaic GPU kernels split K; their float32 partials
``[S, Mp, N]`` are summed by one XLA fusion before the residual add + RMSNorm kernel
(``norm_triton.add_rms_norm``). That kernel can take them unsummed (``SplitKSum``) and save a
launch, at the price of one program reading every partial of its row. This times, by CUPTI GPU
time (the median of ``--reps`` calls, inputs resident in L2 as they are after the GEMM that
writes them): XLA's sum + the norm kernel; the norm kernel with the partials at several
``num_warps``; and the norm kernel on a summed bf16 delta (what the second part of the first
costs alone). JSON to ``kernels/results/norm-split-probe-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.kernels import norm_triton as N
from jaxfp4.ops import SplitKSum


def gpu_us(f, *args, reps: int) -> float:
    from jax.experimental.mosaic.gpu import profiler

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        _, t = profiler.measure(f, aggregate=False)(*args)
        ts.append(sum(ms for _, ms in t) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--splits", default="2,4")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--warps", default="4,8,16,32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    hid = args.hidden
    rng = np.random.default_rng(0)
    records = []
    for m in map(int, args.rows.split(",")):
        for s in map(int, args.splits.split(",")):
            mp = -(-m // 8) * 8
            parts = jnp.asarray(rng.standard_normal((s, mp, hid)), jnp.float32)
            scale = jnp.asarray(rng.uniform(0.5, 2.0, hid), jnp.float32)
            x = jnp.asarray(rng.standard_normal((m, hid)), jnp.bfloat16)
            w = jnp.asarray(rng.uniform(0.5, 2.0, hid), jnp.float32)
            d = SplitKSum(parts, scale, (m,), hid, jnp.dtype(jnp.bfloat16))
            rec = dict(rows=m, splits=s, hidden=hid)
            xla = jax.jit(lambda x, d, w: N.add_rms_norm(x, d.resolve(), w, eps=1e-5))
            rec["xla_sum_then_kernel_us"] = gpu_us(xla, x, d, w, reps=args.reps)
            plain = jax.jit(lambda x, y, w: N.add_rms_norm(x, y, w, eps=1e-5))
            rec["kernel_on_summed_us"] = gpu_us(plain, x, d.resolve(), w, reps=args.reps)
            for nw in map(int, args.warps.split(",")):
                f = jax.jit(lambda x, d, w, nw=nw: N.add_rms_norm(x, d, w, eps=1e-5, num_warps=nw))
                rec[f"kernel_sums_w{nw}_us"] = gpu_us(f, x, d, w, reps=args.reps)
            records.append(rec)
            print(json.dumps(rec))
    dev = jax.devices()[0].device_kind
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"norm-split-probe-{dev.replace(' ', '_')}.json"), "w") as f:
        json.dump(dict(device=dev, jax=jax.__version__, records=records), f, indent=1)


if __name__ == "__main__":
    main()
