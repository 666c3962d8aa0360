"""End-to-end benchmark: a Llama-3-8B-shaped model with random NVFP4 W4A16 weights vs its bf16 twin.

Nothing is downloaded: weights are random (codes, E4M3 scales and the global divisor drawn on the
device), which changes no timing. Measured in the same run, on the same device:

* decode tokens/s at batch 1 and 16: one jit of ``STEPS`` decode steps (``lax.scan``) after a
  prompt, timed as a whole (per-token GPU work; no Python dispatch per token); and the same with
  ``2 * STEPS`` steps, so that each record also holds the steady per-token rate (``marginal_*``:
  the extra steps over the extra time) apart from a call's fixed cost (``fixed_seconds``: the
  one-off work of a call, such as copying its non-donated cache and the first CUDA-graph launch);
* prefill tokens/s at 2048 tokens, batch 1.

Both models are built as a user gets them by default: q/k/v and gate/up fused into one layer each
(``--no-fuse`` keeps them apart), FP4 weights in the GPU kernel layout (``prepare_weights``).

    python kernels/bench_llama.py --out kernels/results            # on the GPU machine
    python kernels/bench_llama.py --layers 2 --vocab 1024 --out /tmp # a quick smoke run (CPU too)
    python kernels/bench_llama.py --tp 2 --phases b1,b16             # tensor parallel over 2 GPUs

``--tp N``: both models tensor-parallel over the first N devices (jaxfp4.models.llama.TPConfig:
Megatron split of every linear layer incl. the LM head, KV cache split by KV heads; FP4 layers
per shard on their own kernel layouts, bf16 ones through XLA's partitioner); results go to
``llama-<device>-tp<N>.json``.

Writes ``llama-<device>.json`` (``{"device", "config", "records": [{"model": "bf16" | "nvfp4_w4a16",
"phase": "decode" | "prefill", "batch", "tokens", "seconds", "tokens_per_s", "tp"}]}``) and a PNG plot.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxfp4
from jaxfp4.checkpoint import Checkpoint, LoadReport
from jaxfp4.formats import FP4Format, GlobalScale, QuantizedTensor
from jaxfp4.models.llama import Llama, TPConfig


def llama3_8b(layers: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    )


def model_arguments(ap: argparse.ArgumentParser, steps: int) -> None:
    """The lab's shared model options: ``--layers``, ``--vocab`` (of :func:`llama3_8b`),
    ``--context`` (where decoding starts), ``--steps`` (decode steps per timed call) and the
    model's ``--attention``, ``--norm``, ``--prefetch`` and ``--defer`` options (``Llama``'s arguments; see
    :func:`model_options`)."""
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--context", type=int, default=128, help="decode starts at this position (cache pre-filled length)")
    ap.add_argument("--steps", type=int, default=steps, help="decode steps per timed call")
    ap.add_argument("--attention", default=None, help="the model's attention: xla or pallas (default: pallas on a GPU)")
    ap.add_argument("--norm", default=None, help="the model's add + RMSNorm: xla or pallas (default: pallas on a GPU)")
    ap.add_argument(
        "--prefetch",
        type=int,
        default=None,
        choices=(0, 1),
        help="the model's L2 prefetch hints between linear layers: 0 off, 1 on (default: on a GPU)",
    )
    ap.add_argument(
        "--defer",
        type=int,
        default=1,
        choices=(0, 1),
        help="1: o_proj / down_proj hand their split-K partials to the norm kernel (the model's way); "
        "0: every linear layer sums its own (XLA), for an A/B",
    )
    ap.add_argument(
        "--prefetch-mb",
        type=float,
        default=None,
        help="MiB of the next layer's weight each kernel asks into L2 (default: jaxfp4.ops.pallas.L2_PREFETCH_BYTES)",
    )


def model_options(args) -> dict:
    """``Llama``'s keyword arguments from :func:`model_arguments`' options (``--prefetch-mb`` sets
    ``jaxfp4.ops.pallas.L2_PREFETCH_BYTES``, which is read when a call is traced; ``--defer 0``
    makes every ``Fp4Linear.deferred`` in this process a plain call)."""
    from jaxfp4.nn import Fp4Linear
    from jaxfp4.ops import pallas

    if not args.defer:  # a lab switch: Fp4Linear.deferred becomes a plain call in this process
        Fp4Linear.deferred = lambda self, x, *, prefetch=None: self(x, prefetch=prefetch)
    if args.prefetch_mb is not None:
        pallas.L2_PREFETCH_BYTES = int(args.prefetch_mb * (1 << 20))
    prefetch = None if args.prefetch is None else bool(args.prefetch)
    return dict(attention=args.attention, norm=args.norm, prefetch=prefetch)


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def random_checkpoint(cfg: dict, fp4: bool, seed: int = 0) -> Checkpoint:
    key = jax.random.key(seed)
    dense, quantized = {}, {}

    def nxt():
        nonlocal key
        key, sub = jax.random.split(key)
        return sub

    def bf16(*shape):
        return (jax.random.normal(nxt(), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)

    h, v = cfg["hidden_size"], cfg["vocab_size"]
    dense["model.embed_tokens.weight"] = bf16(v, h)
    dense["lm_head.weight"] = bf16(v, h)
    dense["model.norm.weight"] = jnp.ones((h,), jnp.bfloat16)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        dense[f"{p}.input_layernorm.weight"] = jnp.ones((h,), jnp.bfloat16)
        dense[f"{p}.post_attention_layernorm.weight"] = jnp.ones((h,), jnp.bfloat16)
        for name, (n, k) in shapes(cfg).items():
            if not fp4:
                dense[f"{p}.{name}.weight"] = bf16(n, k)
                continue
            codes = jax.random.randint(nxt(), (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
            scales = jax.random.uniform(nxt(), (n, k // 16), jnp.float32, 0.5, 2.0).astype(jnp.float8_e4m3fn)
            w = QuantizedTensor(
                codes, scales, jnp.full((1,), 2688.0, jnp.float32), FP4Format.NVFP4, (n, k), (n,), GlobalScale.DIVISOR
            )
            quantized[f"{p}.{name}"] = jaxfp4.make_params(w, jaxfp4.NVFP4W4A16())
    return Checkpoint(
        "random", cfg, "random", "random NVFP4 W4A16" if fp4 else "random bf16", quantized, dense, LoadReport()
    )


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def greedy_decode(graphdef, steps: int, unroll: int = 1, donate: bool = False):
    """A jitted ``(state, cache, tok [B], pos) -> last tok``: ``steps`` greedy decode steps in one
    ``lax.scan`` (per-token GPU work, no Python dispatch per token), ``unroll`` steps per loop
    iteration; ``donate``: the cache is donated (updated in place, not copied first) and returned,
    ``-> (last tok, cache)``, so that the donated buffers become the output's."""

    @functools.partial(jax.jit, donate_argnums=(1,) if donate else ())
    def decode(state, cache, tok, pos):
        m = nnx.merge(graphdef, state)

        def step(carry, _):
            tok, cache, pos = carry
            logits, cache = m(tok[:, None], pos, cache)
            return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache, pos + 1), None

        tok, cache, _ = jax.lax.scan(step, (tok, cache, pos), None, length=steps, unroll=unroll)[0]
        return (tok, cache) if donate else tok

    return decode


def bench_model(model: Llama, name: str, args) -> list[dict]:
    graphdef, state = nnx.split(model)
    tp = 1 if model.tp is None else model.tp.mesh.shape[model.tp.axis]

    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(tokens.shape[0], tokens.shape[1])
        logits, _ = m(tokens, jnp.int32(0), cache)
        return logits[:, -1]

    decode = greedy_decode(graphdef, args.steps)
    decode2 = greedy_decode(graphdef, 2 * args.steps)

    out = []
    phases = args.phases.split(",")
    if "prefill" in phases:
        ptoks = jnp.ones((1, args.prefill), jnp.int32)
        s = timed(prefill, state, ptoks, reps=args.reps)
        out.append(
            dict(model=name, phase="prefill", batch=1, tokens=args.prefill, seconds=s, tokens_per_s=args.prefill / s, tp=tp)
        )
        print(out[-1], flush=True)
    for b in (int(p[1:]) for p in phases if p.startswith("b")):
        # One cache length for both calls, so that their steps cost the same.
        cache = model.init_cache(b, args.context + 2 * args.steps)
        call = (state, cache, jnp.ones((b,), jnp.int32), jnp.int32(args.context))
        s = timed(decode, *call, reps=args.reps)
        s2 = timed(decode2, *call, reps=args.reps)
        per_step = (s2 - s) / args.steps
        out.append(
            dict(
                model=name,
                phase="decode",
                batch=b,
                tokens=b * args.steps,
                seconds=s,
                tokens_per_s=b * args.steps / s,
                marginal_step_seconds=per_step,
                marginal_tokens_per_s=b / per_step,
                fixed_seconds=s - args.steps * per_step,
                cache_len=args.context + 2 * args.steps,
                tp=tp,
            )
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    model_arguments(ap, steps=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--no-fuse", action="store_true", help="run q/k/v and gate/up as separate layers")
    ap.add_argument("--phases", default="prefill,b1,b16", help="prefill and/or decode batch sizes bN")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel over this many devices")
    ap.add_argument("--out", default="kernels/results")
    args = ap.parse_args()
    cfg = llama3_8b(args.layers, args.vocab)
    device = jax.devices()[0].device_kind
    tp = None
    if args.tp > 1:
        auto = (jax.sharding.AxisType.Auto,)
        tp = TPConfig(jax.make_mesh((args.tp,), ("model",), axis_types=auto, devices=jax.devices()[: args.tp]))
    records = []
    for fp4 in (False, True):
        ckpt = random_checkpoint(cfg, fp4)
        model = Llama(
            ckpt,
            dtype=jnp.bfloat16,
            backend=args.backend,
            fuse=not args.no_fuse,
            tp=tp,
            **model_options(args),
        )
        del ckpt
        records += bench_model(model, "nvfp4_w4a16" if fp4 else "bf16", args)
        del model
    os.makedirs(args.out, exist_ok=True)
    tag = device.replace(" ", "_") + (f"-tp{args.tp}" if args.tp > 1 else "")
    result = {
        "device": device,
        "devices": args.tp,
        "jax": jax.__version__,
        "config": cfg,
        "args": vars(args),
        "records": records,
    }
    with open(os.path.join(args.out, f"llama-{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, f"llama-{tag}.png"))


def plot(result: dict, path: str) -> None:
    """Bar plot of a ``llama-<device>.json`` result (``python -c "..."`` can redraw a merged file)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = result["records"]

    def key(r: dict) -> tuple:  # records pair by phase, batch and run (merged files hold several runs)
        return r["phase"], r["batch"], r.get("run", "")

    fp4_of = {key(r): r["tokens_per_s"] for r in records if r["model"] == "nvfp4_w4a16"}
    pairs = [(key(r), r["tokens_per_s"]) for r in records if r["model"] == "bf16" and key(r) in fp4_of]
    labels = [f"{p} b{b}" + (f" ({run})" if run else "") for (p, b, run), _ in pairs]
    base = [t for _, t in pairs]
    fp4 = [fp4_of[k] for k, _ in pairs]
    x = np.arange(len(labels))
    plt.figure(figsize=(max(7, 1.4 * len(labels)), 4))
    plt.bar(x - 0.2, base, 0.4, label="bf16")
    plt.bar(x + 0.2, fp4, 0.4, label="NVFP4 W4A16 (jaxfp4)")
    for i, (b, f) in enumerate(zip(base, fp4, strict=True)):
        plt.text(i + 0.2, f, f"{f / b:.2f}x", ha="center", va="bottom", fontsize=8)
    plt.xticks(x, labels)
    plt.yscale("log")
    plt.ylabel("tokens/s")
    on = result["device"] if result.get("devices", 1) == 1 else f"{result['devices']} x {result['device']}, tensor parallel"
    plt.title(f"Llama-3-8B shape, {result['args']['layers']} layers, {on}")
    plt.legend()
    plt.tight_layout()
    plt.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
