"""GEMM benchmark + small tuning sweep for the FP4 W4A16 kernels (run on the GPU machine).

Timing method (research/performance.md addendum): inside one ``jax.jit`` the op is applied to
``COPIES`` *distinct* weights (separate buffers, unrolled) and the outputs are summed, so neither
Python dispatch (~37 us a call) nor L2 hits (a 33 MB FP4 weight fits the 50 MB L2) are timed;
time per layer = median wall time of the whole jitted call / ``COPIES``. The bf16 baseline is
measured the same way in the same run.

Writes ``$OUT/gemm-<device>.json`` ({"device", "records": [{scheme, M, K, N, backend, us}]}),
``$OUT/configs-<device>.json`` (best config per shape, for jaxfp4/kernels/configs/) and a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxfp4
from jaxfp4.formats import MXFP4W4A16, NVFP4W4A16, FP4Format, GlobalScale, QuantizedTensor
from jaxfp4.kernels.w4a16_triton import BlockConfig
from jaxfp4.ops import pallas as pallas_backend

COPIES = 16
SHAPES = [(4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N)
MS = [1, 16, 128, 4096]
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "400"))


def random_weight(key, n: int, k: int, fmt: FP4Format) -> QuantizedTensor:
    k1, k2 = jax.random.split(key)
    codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    if fmt is FP4Format.NVFP4:
        sb = jax.random.randint(k2, (n, k // 16), 0x20, 0x50, jnp.int32).astype(jnp.uint8)
        scales = jax.lax.bitcast_convert_type(sb, jnp.float8_e4m3fn)
        return QuantizedTensor(codes, scales, jnp.array([3e-4], jnp.float32), fmt, (n, k), (n,), GlobalScale.MULTIPLIER)
    scales = jax.random.randint(k2, (n, k // 32), 118, 124, jnp.int32).astype(jnp.uint8)
    return QuantizedTensor(codes, scales, None, fmt, (n, k), (n,), GlobalScale.NONE)


def time_op(op, x, ws, reps: int = 7) -> float:
    f = jax.jit(lambda x, ws: sum(op(x, w).astype(jnp.float32).sum() for w in ws))
    f(x, ws).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x, ws).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) / len(ws) * 1e6


def candidates(m: int, n: int, k: int, fmt: FP4Format) -> list[BlockConfig]:
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
    return cands if fmt is FP4Format.NVFP4 else cands[:1]


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
        qn = [random_weight(jax.random.fold_in(key, 100 + i), n, k, FP4Format.NVFP4) for i in range(COPIES)]
        qm = [random_weight(jax.random.fold_in(key, 200 + i), n, k, FP4Format.MXFP4) for i in range(COPIES)]
        pn = [jaxfp4.make_params(q, NVFP4W4A16()) for q in qn]
        pm = [jaxfp4.make_params(q, MXFP4W4A16()) for q in qm]
        for m in MS:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            bf16 = time_op(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype), x, wb)
            for scheme, ps in (("nvfp4_w4a16", pn), ("mxfp4_w4a16", pm)):
                rec = dict(scheme=scheme, M=m, K=k, N=n)
                records.append({**rec, "backend": "bf16", "us": bf16})
                xla = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="xla"), x, ps)
                records.append({**rec, "backend": "xla", "us": xla})
                fmt = ps[0].weight.format
                cands = candidates(m, n, k, fmt) if time.time() - t_start < BUDGET_S else [None]
                best = None
                for cfg in cands:
                    pallas_backend._TUNED.pop(device, None)
                    if cfg is not None:
                        pallas_backend._TUNED[device] = [pallas_backend.tuned_entry(m, n, k, fmt, cfg)]
                    try:
                        us = time_op(lambda x, p: jaxfp4.fp4_linear(x, p, backend="pallas"), x, ps)
                    except Exception as e:  # a config that fails to compile is skipped, and said so
                        print("  config failed", cfg, type(e).__name__, str(e)[:200], flush=True)
                        continue
                    print(f"  {scheme} M={m} K={k} N={n} {cfg} -> {us:.1f} us", flush=True)
                    if best is None or us < best[0]:
                        best = (us, cfg)
                pallas_backend._TUNED.pop(device, None)
                chosen = None if best[1] is None else dataclasses.asdict(best[1])
                records.append({**rec, "backend": "pallas", "us": best[0], "config": chosen})
                if best[1] is not None:
                    entry = pallas_backend.tuned_entry(m, n, k, fmt, best[1])
                    tuned.setdefault((entry["m_bucket"], n, k, fmt.value), entry)
                print(
                    f"{scheme:12s} M={m:5d} K={k:5d} N={n:5d} bf16 {bf16:8.1f} xla {xla:8.1f} pallas {best[0]:8.1f}"
                    f"  speedup {bf16 / best[0]:.2f}x",
                    flush=True,
                )
        del wb, qn, qm, pn, pm
    safe = device.replace(" ", "_")
    with open(f"{out}/gemm-{safe}.json", "w") as f:
        json.dump({"device": device, "jax": jax.__version__, "copies": COPIES, "records": records}, f, indent=1)
    with open(f"{out}/configs-{safe}.json", "w") as f:
        json.dump({"device_kind": device, "configs": list(tuned.values())}, f, indent=1)
    plot(records, device, f"{out}/gemm-{safe}.png")


def plot(records, device, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, scheme in zip(axes, ("nvfp4_w4a16", "mxfp4_w4a16"), strict=True):
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
