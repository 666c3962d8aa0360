"""Where a decode step's GPU time goes: CUPTI per-kernel times of one Llama-3-8B-shaped decode step,
bf16 vs NVFP4 W4A16 (random weights, as kernels/bench_llama.py builds them), on the GPU machine.

    python kernels/profile_decode.py --out kernels/results [--layers 32] [--batch 1] [--tp 2]

Kernels are grouped by name (XLA fusions by their kind, Mosaic GPU / Triton kernels by name), and
the sum of kernel times is printed next to the step's wall time (scan of ``--steps`` steps, as in
bench_llama), so the gaps between kernels show too. ``--tp N``: tensor parallel over N GPUs as
bench_llama's; kernel times are then summed over the GPUs (the NCCL kernels' times include waiting
for the peer). Writes ``decode-profile-b<batch>-<device>[-tp<N>].json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.mosaic.gpu import profiler

from jaxfp4.models.llama import Llama, TPConfig
from kernels.bench_llama import greedy_decode, llama3_8b, random_checkpoint


def kind(name: str) -> str:
    """A kernel name without the numeric suffixes XLA adds (``loop_add_fusion_12`` -> ``loop_add_fusion``)."""
    return re.sub(r"[._]\d+$", "", re.sub(r"(_\d+)+$", "", name))


def profile(model: Llama, batch: int, context: int, steps: int) -> dict:
    graphdef, state = nnx.split(model)

    @jax.jit
    def one(state, cache, tok, pos):
        logits, cache = nnx.merge(graphdef, state)(tok[:, None], pos, cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    many = greedy_decode(graphdef, steps)

    cache = model.init_cache(batch, context + steps)
    tok, pos = jnp.ones((batch,), jnp.int32), jnp.int32(context)
    _, timings = profiler.measure(one, aggregate=False)(state, cache, tok, pos)
    groups = collections.defaultdict(lambda: [0, 0.0])
    for name, ms in timings:
        g = groups[kind(name)]
        g[0] += 1
        g[1] += ms * 1e3
    jax.block_until_ready(many(state, cache, tok, pos))
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(many(state, cache, tok, pos))
        walls.append((time.perf_counter() - t) / steps * 1e6)
    kernels_us = sum(ms for _, ms in timings) * 1e3
    rows = sorted(((k, n, us) for k, (n, us) in groups.items()), key=lambda r: -r[2])
    return dict(
        kernels=len(timings),
        kernel_us=kernels_us,
        step_wall_us=sorted(walls)[1],
        groups=[dict(name=k, count=n, us=us) for k, n, us in rows],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    cfg = llama3_8b(args.layers, args.vocab)
    device = jax.devices()[0].device_kind
    result = {"device": device, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(args)}
    result["models"] = {}
    tp = None
    if args.tp > 1:
        auto = (jax.sharding.AxisType.Auto,)
        tp = TPConfig(jax.make_mesh((args.tp,), ("model",), axis_types=auto, devices=jax.devices()[: args.tp]))
    for fp4 in (False, True):
        name = "nvfp4_w4a16" if fp4 else "bf16"
        model = Llama(random_checkpoint(cfg, fp4), dtype=jnp.bfloat16, fuse=not args.no_fuse, tp=tp)
        r = profile(model, args.batch, args.context, args.steps)
        del model
        result["models"][name] = r
        print(f"{name}: {r['kernels']} kernels, {r['kernel_us']:.0f} us of kernels, step wall {r['step_wall_us']:.0f} us")
        for g in r["groups"][:16]:
            print(f"  {g['us']:9.1f} us  {g['count']:4d}x  {g['name']}")
    os.makedirs(args.out, exist_ok=True)
    tag = device.replace(" ", "_") + (f"-tp{args.tp}" if args.tp > 1 else "")
    with open(os.path.join(args.out, f"decode-profile-b{args.batch}-{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
