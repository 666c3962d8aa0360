"""FP8 GEMM probe (run on the GPU machine): which way of writing the W4A8 large-M product makes
XLA:GPU run one cuBLAS FP8 GEMM with the scales and the bf16 cast in its epilogue, and what the
pieces around it cost.

Per M (K x N = 4096 x 14336 by default), the GPU time per layer (CUPTI, ``COPIES`` distinct
weights) of:

* ``bf16``: the bf16 dot (baseline, same run);
* ``fp8_f32``: ``dot(x8, w8) -> float32``, alone;
* ``fp8_f32_epi``: the same times the scalar scale, cast to bf16 (two ops if XLA does not fuse);
* ``fp8_scaled``: ``dot(x8.astype(bf16) * sx, w8.astype(bf16) * sw) -> float32 -> bf16`` (XLA's
  FP8 GEMM pattern with operand scales);
* ``fp8_scaled32``: the same with float32 converts and scales;
* ``fp8_scaled32_out``: the same with the dot's output in bf16; ``fp8_f8_out``: the FP8 dot
  with a bf16 output and no scales (a speed bound only: it rounds before scaling);
* ``act_quant``: ``quantize_fp8_static`` of the activations alone; ``act_nvfp4``: W4A4's
  ``fake_quantize_nvfp4_activations`` (vLLM mode) alone; ``e4m3``: ``mxfp4_as_e4m3``;
* once: ``e4m3`` (``mxfp4_as_e4m3``), its bytes alone (``e4m3_bits``) and exactness alone
  (``e4m3_exact``), the bytes by the float32 -> FP8 convert (``e4m3_float``), exactness from the
  scales alone (``e4m3_window``);
* ``w4a8_dense``: ``fp4_linear`` with the dense path forced (all of it); ``w4a8_nocond``: the
  same pieces without the ``lax.cond`` on exactness; ``w4a8_swap``: those with the GEMM's operands
  swapped (``w8 . x8``, transposed back in the epilogue).

Also the custom-call targets of each compiled variant (is it ``__cublas$lt$matmul$f8``?) and
whether ``fp8_scaled32_out`` equals ``fp8_f32_epi`` bit for bit; ``--breakdown`` lists each kernel
of the named variants. Writes ``$OUT/fp8-gemm-probe-<device>.json``.

    PYTHONPATH=. python kernels/probe_fp8_gemm.py [--ms 1024,4096] [--shape 4096x14336] [--ops bf16,w4a8_dense]
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

import jaxfp4
from jaxfp4.formats import (
    MXFP4W4A8,
    FP4Format,
    fake_quantize_nvfp4_activations,
    mxfp4_as_e4m3,
    mxfp4_e4m3_bytes,
    mxfp4_e4m3_window,
    quantize_fp8_static,
)
from kernels.bench_gemm import COPIES, bf16_dot, gpu_us, random_weight
from kernels.probe_prefill import forced

DIMS = (((1,), (1,)), ((), ()))
SX = 0.02


def _f32(x8, w8):
    return jax.lax.dot_general(x8, w8, DIMS, preferred_element_type=jnp.float32)


def _f32_epi(x8, w8):
    return (_f32(x8, w8) * jnp.float32(SX * 2.0**-3)).astype(jnp.bfloat16)


def _scaled(x8, w8):
    xs = x8.astype(jnp.bfloat16) * jnp.bfloat16(SX)
    ws = w8.astype(jnp.bfloat16) * jnp.bfloat16(2.0**-3)
    return jax.lax.dot_general(xs, ws, DIMS, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _scaled32(x8, w8):
    xs = x8.astype(jnp.float32) * jnp.float32(SX)
    ws = w8.astype(jnp.float32) * jnp.float32(2.0**-3)
    return jax.lax.dot_general(xs, ws, DIMS, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _scaled32_out(x8, w8):
    """The scaled form with the GEMM's own output in bf16 (cuBLAS scales and casts in its epilogue)."""
    xs = x8.astype(jnp.float32) * jnp.float32(SX)
    ws = w8.astype(jnp.float32) * jnp.float32(2.0**-3)
    return jax.lax.dot_general(xs, ws, DIMS, preferred_element_type=jnp.bfloat16)


def _f8_out(x8, w8):
    return jax.lax.dot_general(x8, w8, DIMS, preferred_element_type=jnp.bfloat16)


def _e4m3_bits(q):
    return mxfp4_as_e4m3(q)[0]


def _e4m3_exact(q):
    return mxfp4_as_e4m3(q)[2]


def _w4a8_pieces(x, p, swap: bool = False):
    """The dense W4A8 path without its ``lax.cond`` (the FP8 branch only): what the cond costs.
    ``swap``: the GEMM's operands swapped, ``w8 . x8`` is ``(N, M)``, transposed back in the
    epilogue (does the GEMM's operand order decide the activation codes' layout?)."""
    x8 = quantize_fp8_static(x, p.input_scale)
    w8, shift, _ = mxfp4_as_e4m3(p.weight)
    y = jax.lax.dot_general(w8, x8, DIMS, preferred_element_type=jnp.float32).T if swap else _f32(x8, w8)
    return (y * (p.input_scale.astype(jnp.float32).reshape(()) * jnp.exp2(shift.astype(jnp.float32)))).astype(x.dtype)


def _e4m3_float(q):
    """The E4M3 bytes by the float route (what the dense path runs): ``mxfp4_e4m3_bytes``."""
    return mxfp4_e4m3_bytes(q, mxfp4_e4m3_window(q)[0])


def _e4m3_window(q):
    """Exactness from the scales alone (sufficient, not necessary): ``mxfp4_e4m3_window``."""
    return mxfp4_e4m3_window(q)[1]


def targets(f, *args) -> list[str]:
    text = jax.jit(f).lower(*args).compile().as_text()
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--shape", default="4096x14336")
    ap.add_argument("--ops", default="", help="comma-separated subset of the timed variants (default: all)")
    ap.add_argument("--hlo", default="", help="variants whose optimized HLO (one layer) is written to $OUT")
    ap.add_argument("--breakdown", default="", help="variants whose kernels are listed one by one (GPU us per layer)")
    args = ap.parse_args()
    out = os.environ.get("OUT", ".")
    device = jax.devices()[0].device_kind
    k, n = (int(v) for v in args.shape.split("x"))
    key = jax.random.key(0)
    wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(COPIES)]
    w8 = [(w * 8).astype(jnp.float8_e4m3fn) for w in wb]
    qs = [random_weight(jax.random.fold_in(key, 100 + i), n, k, FP4Format.MXFP4) for i in range(COPIES)]
    ps = [jaxfp4.prepare_weights(jaxfp4.make_params(q, MXFP4W4A8(), input_scale=SX)) for q in qs]
    records, info = [], {}
    for name, fn in (
        ("e4m3", mxfp4_as_e4m3),
        ("e4m3_bits", _e4m3_bits),
        ("e4m3_exact", _e4m3_exact),
        ("e4m3_float", _e4m3_float),
        ("e4m3_window", _e4m3_window),
    ):
        if args.ops and name not in args.ops.split(","):
            continue
        _, us = gpu_us(lambda x, q, fn=fn: fn(q), None, qs)
        records.append(dict(M=0, K=k, N=n, backend=name, us=us))
        print(f"{name} {us:.1f} us", flush=True)
    for m in (int(v) for v in args.ms.split(",")):
        x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
        x8 = quantize_fp8_static(x, jnp.float32(SX))
        ops = {
            "bf16": (bf16_dot, x, wb),
            "fp8_f32": (_f32, x8, w8),
            "fp8_f32_epi": (_f32_epi, x8, w8),
            "fp8_scaled": (_scaled, x8, w8),
            "fp8_scaled32": (_scaled32, x8, w8),
            "fp8_scaled32_out": (_scaled32_out, x8, w8),
            "fp8_f8_out": (_f8_out, x8, w8),
            # four distinct scales (arguments, not constants): four equal quantizations would be
            # computed once and the time per layer come out a quarter of the real one
            "act_quant": (quantize_fp8_static, x, [jnp.float32(SX * (1 + i / 64)) for i in range(4)]),
            "act_nvfp4": (fake_quantize_nvfp4_activations, x, [jnp.float32(336.0 + i) for i in range(4)]),
            "w4a8_dense": (forced(1), x, ps),
            "w4a8_nocond": (_w4a8_pieces, x, ps),
            "w4a8_swap": (lambda x, p: _w4a8_pieces(x, p, swap=True), x, ps),
        }
        times = {}
        for name, (op, xx, ws) in ops.items():
            if args.ops and name not in args.ops.split(","):
                continue
            try:
                _, times[name] = gpu_us(op, xx, ws)
            except Exception as e:  # recorded, not fatal: the probe asks what works
                print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            records.append(dict(M=m, K=k, N=n, backend=name, us=times[name]))
            if m == int(args.ms.split(",")[0]) and name.startswith("fp8"):
                info[name] = targets(op, xx, ws[0])
        for name in filter(None, args.hlo.split(",")):  # the optimized HLO of one layer
            op, xx, ws = ops[name]
            with open(f"{out}/hlo-{name}-M{m}-{k}x{n}.txt", "w") as f:
                f.write(jax.jit(op).lower(xx, ws[0]).compile().as_text())
        if args.breakdown:  # every kernel of the chosen variants, GPU us per layer
            from jax.experimental.mosaic.gpu import profiler

            for name in args.breakdown.split(","):
                op, xx, ws = ops[name]
                _, t = profiler.measure(lambda x, ws, op=op: [op(x, w) for w in ws], aggregate=False)(xx, ws)
                per = {}
                for kname, ms in t:
                    per[kname] = per.get(kname, 0.0) + ms * 1e3 / len(ws)
                info[f"breakdown_{name}_M{m}"] = per
                top = sorted(per.items(), key=lambda kv: -kv[1])
                print(f"  {name}: " + ", ".join(f"{kn} {v:.1f}" for kn, v in top), flush=True)
        ref = np.asarray(jax.jit(_f32_epi)(x8, w8[0]))
        same = bool(np.array_equal(np.asarray(jax.jit(_scaled32_out)(x8, w8[0])), ref))
        info[f"scaled32_out_equals_f32_epi_M{m}"] = same
        print(f"M={m} " + " ".join(f"{b} {t:.1f}" for b, t in times.items()) + f" | same {same}", flush=True)
    print(json.dumps(info), flush=True)
    with open(f"{out}/fp8-gemm-probe-{device.replace(' ', '_')}.json", "w") as f:
        doc = {"device": device, "jax": jax.__version__, "copies": COPIES, "records": records, "info": info}
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
