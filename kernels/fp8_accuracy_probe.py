"""Probe: how far from the exact product are the MXFP4 W4A8 kernels on the GPU?

Both kernels see the same FP8 activation values and MXFP4 weights, whose products are all exact;
only accumulation differs: the W4A16 kernel sums bf16 x bf16 products in float32 on the bf16
tensor cores, the FP8 kernel runs one K=32 FP8 MMA per block (Hopper's reduced-precision FP8
accumulation inside it) and promotes to float32. Errors are measured against the float64 product
and printed relative to ``max|y|`` and to ``A = |x| @ |w|.T`` (the sum of absolute products).

    python kernels/fp8_accuracy_probe.py   # on the GPU machine; writes $OUT/fp8-accuracy-<device>.json

``layer_paths`` runs the whole layer (activation quantization included) three ways against the
float64 product of CPU-computed FP8 codes: run it with and without ``XLA_FLAGS`` to see what
XLA's flags do to the activation rounding.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats import FP4Format, codecs, quantize_fp8_static, quantize_mxfp4_llmcompressor
from jaxfp4.kernels.w4a8_triton import mxfp4_fp8_matmul_partials
from jaxfp4.kernels.w4a16_triton import BlockConfig, epilogue_exponent, fp4_matmul_partials
from kernels.bench_gemm import random_weight


def measure(x8, q, label: str) -> list[dict]:
    wq = np.asarray(codecs.decode_e2m1(codecs.unpack_nibbles(q.codes)), np.float64)
    ws = wq * np.repeat(np.asarray(codecs.decode_e8m0(q.scales), np.float64), 32, axis=1)
    xd = np.asarray(x8.astype(jnp.float32), np.float64)
    exact, a = xd @ ws.T, np.abs(xd) @ np.abs(ws).T
    out = []
    for cfg in (
        BlockConfig(128, 64, 128, 1, 4, 3, dequant="asm"),
        BlockConfig(128, 128, 128, 1, 8, 3, dequant="fp8"),
        BlockConfig(64, 128, 128, 1, 4, 3, dequant="fp8"),
    ):
        if cfg.dequant == "fp8":
            parts = mxfp4_fp8_matmul_partials(x8, q.codes, q.scales, cfg=cfg)
        else:
            parts = fp4_matmul_partials(x8.astype(jnp.bfloat16), q.codes, q.scales, cfg=cfg, mx=True)
        got = np.asarray(parts, np.float64).sum(0) * 2.0 ** epilogue_exponent(cfg, True)
        err = np.abs(got - exact)
        rec = dict(
            data=label,
            kernel="fp8" if cfg.dequant == "fp8" else "w4a16",
            config=cfg.__dict__,
            max_err_over_max_y=float(err.max() / np.abs(exact).max()),
            max_err_over_A=float((err / a).max()),
            median_err_over_A=float(np.median(err / a)),
        )
        print(rec, flush=True)
        out.append(rec)
    return out


def layer_paths(m: int = 16, k: int = 4096, n: int = 14336) -> list[dict]:
    """Through ``fp4_linear``: the "xla" path, the W4A16 kernel and the FP8 kernel on MXFP4 W4A8,
    each against the float64 product of the FP8 codes computed on the CPU (IEEE division)."""
    from jaxfp4 import fp4_linear, make_params
    from jaxfp4.formats import MXFP4W4A8
    from jaxfp4.ops import pallas as pb

    key = jax.random.key(5)
    q = random_weight(jax.random.fold_in(key, 1), n, k, FP4Format.MXFP4)
    p = make_params(q, MXFP4W4A8(), input_scale=0.02)
    x = jax.random.normal(jax.random.fold_in(key, 2), (m, k), jnp.float32).astype(jnp.bfloat16)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        x8 = jax.jit(quantize_fp8_static)(jax.device_put(x, cpu), jnp.float32(0.02))
    x8_gpu = np.asarray(jax.jit(quantize_fp8_static)(x, jnp.float32(0.02)).view(jnp.uint8))
    wq = np.asarray(codecs.decode_e2m1(codecs.unpack_nibbles(q.codes)), np.float64)
    ws = wq * np.repeat(np.asarray(codecs.decode_e8m0(q.scales), np.float64), 32, axis=1)
    exact = np.asarray(x8.astype(np.float32), np.float64) @ ws.T * np.float64(np.float32(0.02))
    out = [dict(check="fp8 codes GPU vs CPU", mismatches=int((x8_gpu != np.asarray(x8).view(np.uint8)).sum()))]
    for name, cfg in (
        ("xla", None),
        ("w4a16 kernel", BlockConfig(16, 64, 256, 2, 4, 3, dequant="bits")),
        ("fp8 kernel", BlockConfig(64, 128, 128, 2, 4, 3, dequant="fp8")),
    ):
        backend = "xla" if cfg is None else "pallas"
        with pb.tuned_override([] if cfg is None else [pb.tuned_entry(m, n, k, FP4Format.MXFP4, cfg, "fp8")]):
            y = jax.jit(lambda x, p, backend=backend: fp4_linear(x, p, backend=backend))(x, p)
        err = np.abs(np.asarray(y, np.float64) - exact)
        out.append(dict(path=name, max_err_over_max_y=float(err.max() / np.abs(exact).max())))
    for r in out:
        print(r, flush=True)
    return out


def main() -> None:
    m, k, n = 128, 4096, 1024
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(jnp.bfloat16)
    x8 = quantize_fp8_static(x, 0.02)
    recs = measure(x8, random_weight(jax.random.fold_in(key, 2), n, k, FP4Format.MXFP4), "random codes, scales 2^-9..2^-4")
    w = (jax.random.normal(jax.random.fold_in(key, 3), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    recs += measure(x8, quantize_mxfp4_llmcompressor(w), "llm-compressor MXFP4 of N(0, 0.02)")
    recs += layer_paths()
    device = jax.devices()[0].device_kind
    tag = os.environ.get("PROBE_TAG", "")
    path = os.path.join(os.environ.get("OUT", "."), f"fp8-accuracy-{device.replace(' ', '_')}{tag}.json")
    with open(path, "w") as f:
        meta = {"device": device, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
        json.dump({**meta, "M": m, "K": k, "N": n, "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
