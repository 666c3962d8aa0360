"""A/B of the model's L2 prefetch hints (``Llama(prefetch=...)``, ``fp4_linear``'s ``prefetch``) at
decode, in one process on one random NVFP4 checkpoint: the same Llama-3-8B-shaped model with the
hints off and with each byte budget of ``--mb`` (``jaxfp4.ops.pallas.L2_PREFETCH_BYTES``), and
its bf16 twin, decode tokens/s per batch size (``bench_llama``'s timing: one jit of ``--steps``
steps and one of twice that, wall clock).

    python kernels/probe_prefetch.py --mb 8,16,32 --phases b1,b16 --out kernels/results

Writes ``prefetch-<device>.json`` (``{"device", "records": [{"model", "prefetch_mb" (null: off),
"batch", "tokens_per_s", "marginal_tokens_per_s", ...}]}``).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from jaxfp4.models.llama import Llama
from jaxfp4.ops import pallas
from kernels.bench_llama import bench_model, llama3_8b, model_arguments, random_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    model_arguments(ap, steps=64)
    ap.add_argument("--mb", default="16", help="prefetch budgets to try, MiB, comma separated")
    ap.add_argument("--phases", default="b1", help="decode batch sizes bN")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16", type=int, default=1, help="also time the bf16 twin")
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    cfg = llama3_8b(args.layers, args.vocab)
    device = jax.devices()[0].device_kind
    records = []
    ckpt = random_checkpoint(cfg, True)
    for mb in [None, *(float(v) for v in args.mb.split(","))]:
        if mb is not None:
            pallas.L2_PREFETCH_BYTES = int(mb * (1 << 20))
        model = Llama(ckpt, dtype=jnp.bfloat16, attention=args.attention, norm=args.norm, prefetch=mb is not None)
        for r in bench_model(model, "nvfp4_w4a16", args):
            records.append({**r, "prefetch_mb": mb})
        del model
    del ckpt
    if args.bf16:
        model = Llama(random_checkpoint(cfg, False), dtype=jnp.bfloat16, attention=args.attention, norm=args.norm)
        records += [{**r, "prefetch_mb": None} for r in bench_model(model, "bf16", args)]
    os.makedirs(args.out, exist_ok=True)
    result = {"device": device, "jax": jax.__version__, "config": cfg, "args": vars(args), "records": records}
    with open(os.path.join(args.out, f"prefetch-{device.replace(' ', '_')}.json"), "w") as f:
        json.dump(result, f, indent=1)
    base = {r["batch"]: r["tokens_per_s"] for r in records if r["model"] == "bf16"}
    for r in records:
        if r["model"] != "bf16":
            ratio = f" ({r['tokens_per_s'] / base[r['batch']]:.2f}x bf16)" if r["batch"] in base else ""
            steady = r["marginal_tokens_per_s"]
            print(f"b{r['batch']} prefetch {r['prefetch_mb']}: {r['tokens_per_s']:.1f} tok/s{ratio}, steady {steady:.1f}")


if __name__ == "__main__":
    main()
