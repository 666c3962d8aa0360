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
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.mosaic.gpu import profiler

from jaxfp4.models.llama import Llama, TPConfig
from kernels.bench_llama import greedy_decode, llama3_8b, model_arguments, model_options, random_checkpoint


def kind(name: str) -> str:
    """A kernel name without the numeric suffixes XLA adds (``loop_add_fusion_12`` -> ``loop_add_fusion``)."""
    return re.sub(r"[._]\d+$", "", re.sub(r"(_\d+)+$", "", name))


def traced(fn, *args):
    """A ``jax.profiler`` trace (``ProfileData``: host events and CUPTI activity records) of one
    call ``fn(*args)``."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(*args))
        (path,) = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")]
        return ProfileData.from_file(path)


def timeline(fn, *args, steps: int) -> dict:
    """Gaps between consecutive GPU kernels over one call of ``fn`` (``steps`` decode steps), from a
    ``jax.profiler`` trace (CUPTI activity records): the GPU span per step, the time some kernel is
    running per step, and per kernel kind the summed gap before it starts (a negative gap is overlap
    with the kernel before, as with programmatic dependent launch)."""
    events, host = [], collections.Counter()
    for plane in traced(fn, *args).planes:
        if plane.name.startswith("/device:GPU:0"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    events += [(e.start_ns, e.start_ns + e.duration_ns, kind(e.name)) for e in line.events]
        elif plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    if re.search(r"Graph|CommandBuffer|Launch|Mosaic|custom", e.name, re.I):
                        host[e.name[:80]] += 1
    events.sort()
    if not events:
        return dict(kernels_per_step=0, host_events=dict(host.most_common(25)))
    before, after = collections.defaultdict(lambda: [0, 0.0, 0.0]), collections.defaultdict(lambda: [0, 0.0, 0.0])
    pairs = collections.defaultdict(lambda: [0, 0.0, 0.0])
    busy, end = 0.0, None
    for i, (s, e, k) in enumerate(events):
        if end is not None:
            gap = (s - end) / 1e3
            for table, key in ((before, k), (after, events[i - 1][2]), (pairs, f"{events[i - 1][2]} -> {k}")):
                row = table[key]
                row[0] += 1
                row[1 if gap >= 0 else 2] += gap
            busy += max(0, e - max(s, end)) / 1e3
        else:
            busy += (e - s) / 1e3
        end = e if end is None else max(end, e)

    def rows(table):
        out = [
            dict(kind=k, count=n, gap_us_per_step=g / steps, overlap_us_per_step=-o / steps)
            for k, (n, g, o) in table.items()
        ]
        return sorted(out, key=lambda r: -r["gap_us_per_step"])

    return dict(
        kernels_per_step=len(events) / steps,
        span_us_per_step=(events[-1][1] - events[0][0]) / 1e3 / steps,
        busy_us_per_step=busy / steps,
        gaps_before=rows(before),
        gaps_after=rows(after),
        gaps_between=rows(pairs),
        host_events=dict(host.most_common(25)),
    )


def profile(model: Llama, batch: int, context: int, steps: int, trace: bool = False, unroll: int = 1) -> dict:
    graphdef, state = nnx.split(model)

    @jax.jit
    def one(state, cache, tok, pos):
        logits, cache = nnx.merge(graphdef, state)(tok[:, None], pos, cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    many = greedy_decode(graphdef, steps, unroll)

    cache = model.init_cache(batch, context + steps)
    tok, pos = jnp.ones((batch,), jnp.int32), jnp.int32(context)
    on_gpu = jax.devices()[0].platform == "gpu"
    _, timings = profiler.measure(one, aggregate=False)(state, cache, tok, pos) if on_gpu else (None, [])
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
    out = dict(
        kernels=len(timings),
        kernel_us=kernels_us,
        step_wall_us=sorted(walls)[1],
        groups=[dict(name=k, count=n, us=us) for k, n, us in rows],
        sequence=[(kind(name), ms * 1e3) for name, ms in timings],  # one step's kernels in launch order
    )
    if trace:
        out["timeline"] = timeline(many, state, cache, tok, pos, steps=steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    model_arguments(ap, steps=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default="kernels/results")
    ap.add_argument("--timeline", action="store_true", help="also trace the scan and report kernel gaps")
    ap.add_argument("--models", default="bf16,nvfp4_w4a16")
    ap.add_argument("--unroll", type=int, default=1, help="decode steps per scan iteration")
    ap.add_argument("--tag", default="", help="suffix for the output file name (e.g. a flag variant)")
    args = ap.parse_args()
    cfg = llama3_8b(args.layers, args.vocab)
    device = jax.devices()[0].device_kind
    result = {"device": device, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(args)}
    result["models"] = {}
    tp = None
    if args.tp > 1:
        auto = (jax.sharding.AxisType.Auto,)
        tp = TPConfig(jax.make_mesh((args.tp,), ("model",), axis_types=auto, devices=jax.devices()[: args.tp]))
    for name in args.models.split(","):
        fp4 = {"bf16": False, "nvfp4_w4a16": True}[name]
        model = Llama(
            random_checkpoint(cfg, fp4),
            dtype=jnp.bfloat16,
            fuse=not args.no_fuse,
            tp=tp,
            **model_options(args),
        )
        r = profile(model, args.batch, args.context, args.steps, trace=args.timeline, unroll=args.unroll)
        del model
        result["models"][name] = r
        print(f"{name}: {r['kernels']} kernels, {r['kernel_us']:.0f} us of kernels, step wall {r['step_wall_us']:.0f} us")
        for g in r["groups"][:16]:
            print(f"  {g['us']:9.1f} us  {g['count']:4d}x  {g['name']}")
        mosaic = [us for k, us in r["sequence"] if "mosaic" in k]
        if per := len(mosaic) // args.layers:  # q/k/v, o_proj, gate/up, down_proj when fused
            means = [sum(mosaic[i::per]) / len(mosaic[i::per]) for i in range(per)]
            print("  Mosaic GPU kernels by place in a layer (us):", " ".join(f"{v:.2f}" for v in means))
        if r.get("timeline", {}).get("kernels_per_step"):
            t = r["timeline"]
            span, busy = t["span_us_per_step"], t["busy_us_per_step"]
            print(f"  timeline: {t['kernels_per_step']:.0f} kernels/step, span {span:.0f} us, busy {busy:.0f} us")
            for g in t["gaps_before"][:8]:
                print(
                    f"    gap before {g['kind']}: {g['gap_us_per_step']:.1f} us/step, overlap {g['overlap_us_per_step']:.1f}"
                )
            print("   ", t["host_events"])
    os.makedirs(args.out, exist_ok=True)
    tag = device.replace(" ", "_") + (f"-tp{args.tp}" if args.tp > 1 else "") + (f"-{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, f"decode-profile-b{args.batch}-{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
