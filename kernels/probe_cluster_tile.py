"""Where the Mosaic GPU kernel's cluster split-K reduction goes wrong at large token tiles.

Session 19 saw ``MgpuConfig.cluster`` disagree with the xla path at 64-token tiles on the H100
(exact at 8, 16 and 40), so the kernel refuses tiles above ``CLUSTER_MAX_TILE``. This probe lifts
that limit and compares, per token tile size, the cluster form against the same kernel with one
K split (fused epilogue, no reduction: the tested path), both with float32 outputs, and prints
which outputs differ beyond re-association: their weight rows within the 64-row tile and their
token columns, which says whether a whole rank's partial, a row group of the accumulator layout
or single columns go missing. JSON to ``kernels/results/cluster-tile-probe-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats import quantize_nvfp4_llmcompressor
from jaxfp4.kernels import w4a16_mgpu as K


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,32,40,56,64,96,128")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    K.CLUSTER_MAX_TILE = K.MAX_TOKENS  # the probe's point: run the refused tiles
    n, k = args.n, args.k
    w = (jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 0.05).astype(jnp.bfloat16)
    q = quantize_nvfp4_llmcompressor(w)
    codes, scales = K.kernel_operands(q.codes, q.scales)
    e = K.epilogue_rows(K.row_multipliers(jnp.ones((n,), jnp.float32), False))
    records = []
    for m in (int(t) for t in args.tokens.split(",")):
        x = jax.random.normal(jax.random.key(m), (K.input_rows(m), k), jnp.float32).astype(jnp.bfloat16)
        ref = K.fp4_matmul_fused_mgpu(x, codes, scales, e, cfg=K.MgpuConfig(256, 1, 2), mx=False, out_dtype=jnp.float32)
        ref = np.asarray(ref, np.float64)[:m]
        for split, stages, ctas in ((2, 2, 0), (2, 2, 4), (4, 2, 0)):
            cfg = K.MgpuConfig(256, split, stages, ctas=ctas, cluster=True)
            try:
                got = K.fp4_matmul_fused_mgpu(x, codes, scales, e, cfg=cfg, mx=False, out_dtype=jnp.float32)
                got = np.asarray(got, np.float64)[:m]
            except Exception as err:  # a lab probe: record and go on
                records.append(dict(m=m, cfg=repr(cfg), error=str(err)[:400]))
                print(m, cfg, "error", str(err)[:200])
                continue
            tol = 1e-5 * np.abs(ref).max()
            bad = np.abs(got - ref) > tol
            tok, row = np.nonzero(bad)
            rec = dict(
                m=m,
                tile=K.token_tile(m),
                cfg=repr(cfg),
                bad=int(bad.sum()),
                of=int(bad.size),
                max_abs_diff=float(np.abs(got - ref).max()),
                ref_max=float(np.abs(ref).max()),
                rows_in_tile=sorted({int(r) % 64 for r in row})[:64],
                row_tiles=sorted({int(r) // 64 for r in row}),
                tokens=sorted({int(t) for t in tok})[:64],
                ratio_median=float(np.median(got[bad] / ref[bad])) if bad.any() else None,
            )
            records.append(rec)
            print(json.dumps(rec))
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0].device_kind
    with open(os.path.join(args.out, f"cluster-tile-probe-{dev.replace(' ', '_')}.json"), "w") as f:
        json.dump(dict(device=dev, jax=jax.__version__, n=n, k=k, records=records), f, indent=1)


if __name__ == "__main__":
    main()
