"""Where a decode call's one-off cost goes (bench_llama's ``fixed_seconds``: NVFP4 6.1 ms a call at
batch 1 against bf16's 1.0 ms in run J): per model, the wall time of scans of S and 2S steps
(fixed cost = 2 t(S) - t(2S)), with the caches passed as they are or donated, and the host events
of one traced call that last longest (a ``jax.profiler`` trace).

    python kernels/probe_call_overhead.py --out kernels/results

Writes ``call-overhead-<device>.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxfp4.models.llama import Llama
from kernels.bench_llama import greedy_decode, llama3_8b, model_arguments, model_options, random_checkpoint
from kernels.profile_decode import traced


def wall(fn, model, args, reps: int, donate: bool) -> float:
    ts = []
    cache = model.init_cache(1, args.context + 2 * args.steps)
    for _ in range(reps + 1):
        c = model.init_cache(1, args.context + 2 * args.steps) if donate else cache
        jax.block_until_ready(c)
        t = time.perf_counter()
        jax.block_until_ready(fn(nnx.state(model), c, jnp.ones((1,), jnp.int32), jnp.int32(args.context)))
        ts.append(time.perf_counter() - t)
    return sorted(ts[1:])[len(ts[1:]) // 2]


def host_events(fn, model, args) -> list[dict]:
    cache = model.init_cache(1, args.context + 2 * args.steps)
    call = (nnx.state(model), cache, jnp.ones((1,), jnp.int32), jnp.int32(args.context))
    jax.block_until_ready(fn(*call))
    totals = collections.defaultdict(lambda: [0, 0.0])
    for plane in traced(fn, *call).planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    t = totals[e.name[:100]]
                    t[0] += 1
                    t[1] += e.duration_ns / 1e3
    rows = [dict(name=k, count=n, us=us) for k, (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["us"])[:40]


def main() -> None:
    ap = argparse.ArgumentParser()
    model_arguments(ap, steps=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="nvfp4_w4a16,bf16")
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    cfg = llama3_8b(args.layers, args.vocab)
    device = jax.devices()[0].device_kind
    result = {"device": device, "jax": jax.__version__, "args": vars(args), "models": {}}
    for name in args.models.split(","):
        model = Llama(random_checkpoint(cfg, name != "bf16"), dtype=jnp.bfloat16, **model_options(args))
        graphdef = nnx.graphdef(model)
        r = {}
        for donate in (False, True):
            t1 = wall(greedy_decode(graphdef, args.steps, donate=donate), model, args, args.reps, donate)
            t2 = wall(greedy_decode(graphdef, 2 * args.steps, donate=donate), model, args, args.reps, donate)
            r["donated" if donate else "passed"] = dict(t_steps=t1, t_2steps=t2, fixed_ms=(2 * t1 - t2) * 1e3)
            print(name, "donated" if donate else "passed", r["donated" if donate else "passed"], flush=True)
        r["host_events"] = host_events(greedy_decode(graphdef, args.steps), model, args)
        for e in r["host_events"][:15]:
            print(f"   {e['us']:10.0f} us {e['count']:6d}x {e['name']}", flush=True)
        result["models"][name] = r
        del model
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"call-overhead-{device.replace(' ', '_')}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
