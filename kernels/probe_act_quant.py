"""NVFP4 activation quantize-dequantize (vLLM mode): the one Pallas kernel vs the XLA path (run on
the GPU machine). GPU time by CUPTI (every kernel each launches), over ``COPIES`` distinct
activation arrays per jit, for M x K in ``--ms`` x ``--ks``; each kernel output is checked bit for
bit against the XLA path's. Writes ``$OUT/act-quant-<device>.json``.

    PYTHONPATH=. python kernels/probe_act_quant.py --ms 1,16,128,4096 --ks 4096,14336
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats.activations import fake_quantize_nvfp4_activations
from jaxfp4.kernels.act_triton import fake_quantize_nvfp4_vllm
from kernels.bench_gemm import COPIES, gpu_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16,128,4096")
    ap.add_argument("--ks", default="4096,14336")
    args = ap.parse_args()
    dev = jax.devices()[0].device_kind
    g = jnp.float32(300.0)
    records = []
    for k in map(int, args.ks.split(",")):
        for m in map(int, args.ms.split(",")):
            xs = [jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16) for i in range(COPIES)]
            ys_x, xla = gpu_us(lambda _, x: fake_quantize_nvfp4_activations(x, g), None, xs)
            ys_k, ker = gpu_us(lambda _, x: fake_quantize_nvfp4_vllm(x, g), None, xs)
            bits = [[np.asarray(jax.lax.bitcast_convert_type(y, jnp.uint16)) for y in ys] for ys in (ys_x, ys_k)]
            same = all(np.array_equal(a, b) for a, b in zip(*bits, strict=True))
            rec = dict(M=m, K=k, xla_us=xla, kernel_us=ker, bit_identical=same)
            records.append(rec)
            print(rec, flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"act-quant-{dev.replace(' ', '_')}.json"), "w") as f:
        json.dump({"device": dev, "jax": jax.__version__, "copies": COPIES, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
