"""Generate text from an FP4 checkpoint with the jaxfp4 Llama, jit-compiled (CPU is fine).

    python examples/generate.py                                   # the tiny shipped checkpoint
    python examples/generate.py --checkpoint DIR --prompt "t5 t9 t42" --max-new-tokens 32
    python examples/generate.py --temperature 0.8 --top-k 20 --seed 1

The prompt is tokenized with the checkpoint's ``tokenizer.json`` when it is a whitespace
WordLevel vocabulary (the shipped fixtures), by the ``tokenizers`` package when it is installed,
or given directly as ids with ``--prompt-ids 1,5,9``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import jaxfp4
from jaxfp4.models import Llama, generate
from jaxfp4.models.llama import TPConfig
from jaxfp4.sharding import checkpoint_placement

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ct-nvfp4")


class Tokenizer:
    """Encode/decode with a checkpoint's tokenizer.json (no dependency for WordLevel vocabularies)."""

    def __init__(self, path: str):
        self.fast = None
        self.vocab: dict[str, int] | None = None
        f = os.path.join(path, "tokenizer.json")
        if not os.path.exists(f):
            return
        with open(f) as fh:
            spec = json.load(fh)
        if (spec.get("model") or {}).get("type") == "WordLevel":
            self.vocab = spec["model"]["vocab"]
            self.inverse = {v: k for k, v in self.vocab.items()}
            self.unk = self.vocab.get(spec["model"].get("unk_token", ""), 0)
            return
        try:
            from tokenizers import Tokenizer as Fast

            self.fast = Fast.from_file(f)
        except ImportError:
            pass

    def encode(self, text: str) -> list[int]:
        if self.vocab is not None:
            return [self.vocab.get(w, self.unk) for w in text.split()]
        if self.fast is not None:
            return self.fast.encode(text).ids
        raise SystemExit("no usable tokenizer.json: pass --prompt-ids")

    def decode(self, ids: list[int]) -> str:
        if self.vocab is not None:
            return " ".join(self.inverse.get(i, "<?>") for i in ids)
        if self.fast is not None:
            return self.fast.decode(ids)
        return " ".join(map(str, ids))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", default=DEFAULT, help="checkpoint directory (default: the shipped tiny NVFP4 W4A4 Llama)"
    )
    ap.add_argument("--prompt", default="t1 t2 t3 t5 t8 t13 t21 t34")
    ap.add_argument("--prompt-ids", default=None, help="comma-separated token ids (overrides --prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="rows (the prompt repeated), to measure batched decode")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backend", default=None, choices=[None, "xla", "pallas"], help="jaxfp4 backend (default: auto)")
    ap.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree: split the model over this many devices (on CPU, simulate them with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )
    args = ap.parse_args(argv)

    def step(msg: str) -> float:
        print(f"[jaxfp4] {msg}", file=sys.stderr, flush=True)
        return time.perf_counter()

    t = step(f"loading {os.path.normpath(args.checkpoint)} on {jax.devices()[0].platform}")
    tp = None
    if args.tp > 1:
        if len(jax.devices()) < args.tp:
            ap.error(f"--tp {args.tp} needs {args.tp} devices, found {len(jax.devices())}")
        auto = (jax.sharding.AxisType.Auto,)
        mesh = jax.make_mesh((args.tp,), ("model",), axis_types=auto, devices=jax.devices()[: args.tp])
        tp = TPConfig(mesh, "model")
    place = None if tp is None else checkpoint_placement(tp.mesh, "model")
    ckpt = jaxfp4.load_checkpoint(args.checkpoint, place=place)
    model = Llama(ckpt, dtype=jnp.dtype(args.dtype), backend=args.backend, tp=tp)
    took = time.perf_counter() - t
    t = step(f"  {ckpt.description}; {len(ckpt.quantized)} FP4 linears, {len(ckpt.dense)} dense tensors ({took:.2f} s)")

    tok = Tokenizer(args.checkpoint)
    ids = [int(i) for i in args.prompt_ids.split(",")] if args.prompt_ids else tok.encode(args.prompt)
    prompt = jnp.asarray([ids] * args.batch, jnp.int32)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, eos_id=None)
    key = jax.random.key(args.seed)

    t = step(f"compiling prefill ({len(ids)} tokens) + {args.max_new_tokens}-step decode loop")
    compiled_tokens, _ = generate(model, prompt, key=key, **kw)
    compiled_tokens.block_until_ready()
    t = step(f"  compiled and ran once in {time.perf_counter() - t:.2f} s; timing a second run")
    tokens, _ = generate(model, prompt, key=key, **kw)
    tokens.block_until_ready()
    dt = time.perf_counter() - t
    n = args.batch * args.max_new_tokens
    print(f"prompt:    {tok.decode(ids)}")
    print(f"generated: {tok.decode([int(i) for i in tokens[0]])}")
    print(f"speed:     {n / dt:.1f} tokens/s ({n} tokens, batch {args.batch}, prefill + decode in {dt * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
