"""Decode attention on the GPU: the one-kernel ``attn_triton.decode_attention`` (variants) against
the model's jnp attention (``jaxfp4.models.llama.attend``) by CUPTI GPU time, in one run.

Both paths start from the raw q/k/v projections of one token per row and end with the output and
the updated caches: the kernel path includes the XLA fusion that rotary-embeds q and k and
concatenates the operand. The median of ``--reps`` calls is kept; the cache copies XLA makes
because the timed function's caches are not donated are left out (a model step updates them in
place).

    python kernels/bench_attention.py --out kernels/results

Writes ``attention-<device>.json``: ``{"device", "records": [{"batch", "max_len", "pos", "path":
"xla" | "kernel", "block", "num_warps", "us", "kernels"}]}`` (records of session 17's first run
also have ``per_head``: a variant with one program per query head, removed after it).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.models.llama import attend, attend_decode

H, KVH, D = 32, 8, 128  # Llama-3-8B


def paths(b: int):
    """The model's two attention paths (``attend``, ``attend_decode``) on a row-major ``qkv``."""

    def run(attention, qkv, cos, sin, kc, vc, pos, **kw):
        q, k, v = jnp.split(qkv, [H * D, (H + KVH) * D], axis=-1)
        q, k, v = q.reshape(b, 1, H, D), k.reshape(b, 1, KVH, D), v.reshape(b, 1, KVH, D)
        o, (kc, vc) = attention(q, k, v, cos[None, None], sin[None, None], (kc, vc), pos, **kw)
        return o[:, 0], kc, vc

    return functools.partial(run, attend), functools.partial(run, attend_decode)


def gpu_us(fn, make, reps: int) -> tuple[float, list[str]]:
    """Median GPU time of ``fn(*make())`` over ``reps`` calls, and its kernels' names. The caches
    are not donated here (the profiler may call ``fn`` more than once), so XLA copies them before
    updating them in place, on both paths; those copies are left out of the sum."""
    from jax.experimental.mosaic.gpu import profiler

    f = jax.jit(fn)
    args = make()
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        _, t = profiler.measure(f, aggregate=False)(*args)
        kept = [(n, ms) for n, ms in t if "copy" not in n.lower()]
        ts.append(sum(ms for _, ms in kept) * 1e3)
    return statistics.median(ts), [n for n, _ in kept]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1:160:150,1:256:250,16:256:250,1:1024:1000,1:4096:4000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    device = jax.devices()[0].device_kind
    records = []
    for case in args.cases.split(","):
        b, s, pos = map(int, case.split(":"))
        rng = np.random.default_rng(0)
        qkv = jnp.asarray(rng.standard_normal((b, (H + 2 * KVH) * D)), jnp.bfloat16)
        cos, sin = jnp.asarray(np.cos(np.arange(D)), jnp.bfloat16), jnp.asarray(np.sin(np.arange(D)), jnp.bfloat16)
        kc0 = jnp.asarray(rng.standard_normal((b, s, KVH, D)), jnp.bfloat16)

        def make(kc0=kc0, qkv=qkv, cos=cos, sin=sin, pos=pos):
            return qkv, cos, sin, kc0, kc0, jnp.int32(pos)

        xla, kernel = paths(b)
        rec = dict(batch=b, max_len=s, pos=pos)
        us, names = gpu_us(xla, make, args.reps)
        records.append(dict(rec, path="xla", us=us, kernels=names))
        print(records[-1], flush=True)
        for block, warps in itertools.product((32, 64, 128, 256), (4, 8)):
            if block > max(16, 1 << (s - 1).bit_length()):
                continue
            kw = dict(block=block, num_warps=warps)
            try:
                us, names = gpu_us(lambda *a, kw=kw, kernel=kernel: kernel(*a, **kw), make, args.reps)
            except Exception as e:  # a variant that does not compile (registers, shared memory)
                print(kw, type(e).__name__, str(e)[:200], flush=True)
                continue
            records.append(dict(rec, path="kernel", **kw, us=us, kernels=names))
            print(records[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"attention-{device.replace(' ', '_')}.json"), "w") as f:
        json.dump({"device": device, "jax": jax.__version__, "heads": [H, KVH, D], "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
