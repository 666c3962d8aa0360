"""Config sweep for the Mosaic GPU W4A16 kernel (run on the GPU machine; the kernel lab's notebook).

For each shape and M: the GPU time of one layer, measured by CUPTI as the sum of every kernel
that ``mgpu_linear`` launches (the Mosaic kernel and, with split-K, XLA's reduction + epilogue
fusion), over ``COPIES`` distinct weights inside one jit so that weights stream from HBM, not
L2; Python dispatch is not in it. Candidates: K splits that leave at most ~2 units of work per SM,
256- or 512-K steps, as many stages (up to 8) as fit in the shared memory of 2, 3 or 4 CTAs per SM,
the persistent grid that shares the units evenly among the CTAs that fit at once and one CTA per
unit; plus the heuristic config and the heuristic without persistence (``ctas=0``). The bf16
dot's kernel time is measured in the same run. Each candidate's output is checked against the
heuristic's (a smoke check for the tile mapping; exactness is tests/kernels/test_w4a16_mgpu.py's).

Writes ``$OUT/tune-mgpu-<device>.json`` (every record, best per shape, the tuned-config records
for ``jaxfp4/kernels/configs/``), appending as it goes, so a run cut short keeps what it measured.

    PYTHONPATH=. python kernels/tune_mgpu.py --ms 1 --shapes 4096x6144,4096x28672 [--budget-s 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats import FP4Format
from jaxfp4.kernels import w4a16_mgpu as K
from jaxfp4.ops import pallas
from kernels.bench_gemm import COPIES, gpu_us, random_weight
from kernels.probe_mgpu import layout


@dataclasses.dataclass(frozen=True)
class _Form:
    """What the sweep tries for one kernel form: K splits of at least ``min_k`` leaving fewer than
    ~``units_per_sm`` units per SM, steps of ``bks`` K, as many stages (up to 8) as fit in the
    shared memory of each of ``resident`` CTAs per SM, and (``one_per_unit``) one CTA per unit
    beside the persistent grid."""

    min_k: int
    units_per_sm: int
    bks: tuple[int, ...]
    resident: tuple[int, ...]
    one_per_unit: bool


_FORMS = {
    # One-warpgroup CTAs: one per SM with a deep pipeline lost everywhere (2026-11-23).
    1: _Form(min_k=1024, units_per_sm=2, bks=(256, 512), resident=(2, 3, 4), one_per_unit=True),
    # Warp-specialized CTAs: one per SM (their consumers take most of the register file).
    2: _Form(min_k=512, units_per_sm=4, bks=(128, 256, 512), resident=(1,), one_per_unit=False),
}


def candidates(
    m: int, n: int, k: int, sms: int, wgs: tuple[int, ...] = (1,), inflight: tuple[int, ...] = (0,)
) -> list[K.MgpuConfig]:
    """Configs of the forms ``wgs`` (:data:`_FORMS`): one-warpgroup CTAs with K splits that leave
    at most ~2 units per SM, 256- or 512-K steps, stages filling 2, 3 or 4 CTAs per SM, the
    persistent grid for that many CTAs per SM and one CTA per unit; warp-specialized CTAs with
    up to ~4 units per SM, 128-, 256- or 512-K steps, stages filling one CTA per SM, a persistent
    grid of at most one CTA per SM, each with every ``inflight`` value (one-warpgroup CTAs: 0
    only; it lost everywhere, 2026-11-23)."""
    mt = K.token_tile(m)
    out: list[K.MgpuConfig] = []
    for g in wgs:
        form = _FORMS[g]
        if n % (K.ROWS * g):
            continue
        tiles = K.work_units(m, n, 1, g)
        for split in (1, 2, 4, 8):
            ks = k // split
            if k % split or ks < form.min_k or (split > 1 and tiles * split // 2 >= form.units_per_sm * sms):
                continue
            for bk in form.bks:
                if ks % bk:
                    continue
                out_bytes = 2 if split == 1 else 4
                for resident in form.resident:
                    budget = K.SMEM_LIMIT // resident - 1024
                    stages = 2
                    while stages < 8 and K.smem_bytes(mt, bk, stages + 1, out_bytes, wgs=g) <= budget:
                        stages += 1
                    if K.smem_bytes(mt, bk, stages, out_bytes, wgs=g) > budget:
                        continue
                    units = tiles * split
                    per = -(-units // (resident * sms))
                    # The persistent grid sized for `resident` CTAs per SM, and one CTA per unit (the
                    # GPU then packs as many per SM as registers and shared memory allow).
                    for ctas in (-(-units // per), units) if form.one_per_unit else (-(-units // per),):
                        for fl in inflight if g > 1 else (0,):
                            cfg = K.MgpuConfig(bk, split, stages, ctas=ctas, inflight=fl, wgs=g)
                            if cfg not in out:
                                out.append(cfg)
    return out


def weight_sets(shapes: str, formats: str, key: jax.Array):
    """For each ``KxN`` in ``shapes`` and format in ``formats``: ``(K, N, COPIES bf16 weights
    (N, K), format name, COPIES random quantized weights)``, distinct weights so that a layer's
    timing streams them from HBM; the bf16 ones are made once per shape."""
    for shape in shapes.split(","):
        k, n = map(int, shape.split("x"))
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
        for fname in formats.split(","):
            fmt = FP4Format(fname)
            yield k, n, wb, fname, [random_weight(jax.random.fold_in(key, 100 + i), n, k, fmt) for i in range(COPIES)]


def layer_us(x: jax.Array, layouts, mx: bool, cfg: K.MgpuConfig) -> tuple[float, jax.Array]:
    """GPU time of one layer (us, all its kernels) and the first layer's output."""
    ys, us = gpu_us(lambda x, kl: pallas.mgpu_linear(x, kl, mx, None, jnp.bfloat16, cfg), x, layouts)
    return us, ys[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x6144,4096x4096,4096x28672,14336x4096,4096x14336,8192x8192")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--formats", default="nvfp4")
    ap.add_argument("--wgs", default="1,2", help="compute warpgroups per CTA to try (MgpuConfig.wgs)")
    ap.add_argument("--inflight", default="0", help="MgpuConfig.inflight values to try with wgs=2")
    ap.add_argument("--max-split", type=int, default=8, help="largest split_k to try")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--write-configs", default=None, help="merge the best configs into this tuned-config file")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="only the chosen config and its lab diagnostics (dequant none / noscale / skip: what the "
        "layer costs without the expansion math, without the scales, with nothing but the copies)",
    )
    ap.add_argument(
        "--compare-inflight",
        action="store_true",
        help="only the chosen (tuned or heuristic) config, with and without a wgmma left running across steps",
    )
    ap.add_argument(
        "--compare-cluster",
        action="store_true",
        help="only the chosen config, and where it splits K the same with the partials summed in the kernel by clusters",
    )
    args = ap.parse_args()
    out = os.environ.get("OUT", ".")
    dev = jax.devices()[0].device_kind
    sms = pallas.sm_count()
    path = os.path.join(out, f"tune-mgpu-{dev.replace(' ', '_')}.json")
    result = {"device": dev, "jax": jax.__version__, "sms": sms, "copies": COPIES, "records": [], "tuned": []}
    t0 = time.time()
    key = jax.random.key(0)
    for k, n, wb, fname, qs in weight_sets(args.shapes, args.formats, key):
        fmt = FP4Format(fname)
        mx = fmt is FP4Format.MXFP4
        layouts = [layout(q) for q in qs]
        for m in map(int, args.ms.split(",")):
            if time.time() - t0 > args.budget_s:
                break
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            _, bf16 = gpu_us(lambda x, w: jnp.dot(x, w.T), x, wb)
            heur = pallas.choose_mgpu_config(m, n, k, fmt)
            ref_us, ref = layer_us(x, layouts, mx, heur)
            ref = np.asarray(ref.astype(jnp.float32))
            tried = {str(heur): ref_us}
            print(f"{fname} M={m} K={k} N={n}: bf16 {bf16:.1f} us; heuristic {heur} {ref_us:.1f} us", flush=True)
            best = (ref_us, heur)
            if args.compare_inflight:
                tries = [dataclasses.replace(heur, inflight=1 - heur.inflight)]
            elif args.compare_cluster:  # the chosen split, and 2 (clusters of 4 cost more), summed in clusters
                np_ = -(-n // K.ROWS) * K.ROWS
                tries = [
                    dataclasses.replace(heur, split_k=sk, cluster=True, ctas=K.work_units(m, np_, sk))
                    for sk in dict.fromkeys((heur.split_k, 2))
                    if heur.split_k > 1 and heur.wgs == 1 and k % (sk * heur.bk) == 0
                ]
            elif args.diagnose:
                tries = [dataclasses.replace(heur, dequant=d) for d in ("none", "noscale", "skip")]
            else:
                wgs = tuple(int(g) for g in args.wgs.split(","))
                fl = tuple(int(v) for v in args.inflight.split(","))
                tries = [dataclasses.replace(heur, ctas=0), *candidates(m, n, k, sms, wgs, fl)]
                tries = [c for c in tries if c.split_k <= args.max_split]
            for cfg in tries:
                if str(cfg) in tried or time.time() - t0 > args.budget_s:
                    continue
                try:
                    us, y = layer_us(x, layouts, mx, cfg)
                except Exception as e:  # a config that fails to compile is skipped, and said so
                    print("  failed", cfg, type(e).__name__, str(e)[:300], flush=True)
                    continue
                err = float(np.max(np.abs(np.asarray(y.astype(jnp.float32)) - ref)) / (np.max(np.abs(ref)) + 1e-30))
                ok = err < 2e-2  # bf16 outputs of two summation orders: ~1 bf16 ulp; a wrong tile is O(1)
                tried[str(cfg)] = us
                print(f"  {cfg}: {us:.1f} us ({bf16 / us:.2f}x bf16) err {err:.1e}{'' if ok else ' WRONG'}", flush=True)
                if ok and us < best[0] and cfg.dequant == "ptx":
                    best = (us, cfg)
            rec = dict(format=fname, M=m, K=k, N=n, bf16_us=bf16, heuristic=str(heur), us=tried, best=str(best[1]))
            result["records"].append(rec)
            result["tuned"].append({"kernel": "mgpu", **pallas.tuned_entry(m, n, k, fmt, best[1])})
            print(f"  best {best[1]}: {best[0]:.1f} us ({bf16 / best[0]:.2f}x bf16)", flush=True)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
        del layouts
    if args.write_configs:
        merge_configs(args.write_configs, result["tuned"])


def merge_configs(path: str, tuned: list[dict]) -> None:
    """Replace the Mosaic GPU records of the measured (M bucket, N, K, format) keys in a
    tuned-config file (``jaxfp4/kernels/configs/<device>.json``) by ``tuned``."""
    with open(path) as f:
        data = json.load(f)

    def key(r: dict) -> tuple:
        return r.get("kernel"), r["m_bucket"], r["n"], r["k"], r["format"]

    keys = {key(r) for r in tuned}
    kept = [r for r in data["configs"] if key(r) not in keys]
    data["configs"] = kept + tuned
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
