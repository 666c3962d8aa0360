"""Quantize a small MLP to NVFP4 with llm-compressor's encoder and run it jitted (CPU is fine).

python examples/quickstart.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxfp4
from jaxfp4.nn import Fp4Linear


def main() -> None:
    rngs = nnx.Rngs(0)
    up = nnx.Linear(256, 512, rngs=rngs, param_dtype=jnp.bfloat16)
    down = nnx.Linear(512, 256, rngs=rngs, param_dtype=jnp.bfloat16)
    fup = Fp4Linear.from_dense(up, recipe=jaxfp4.NVFP4W4A16())
    fdown = Fp4Linear.from_dense(down, recipe=jaxfp4.NVFP4W4A16())

    @nnx.jit
    def mlp(a, b, x):
        return b(jax.nn.silu(a(x)))

    x = jax.random.normal(jax.random.key(1), (8, 256), jnp.bfloat16)
    y = mlp(fup, fdown, x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(20):
        y = mlp(fup, fdown, x)
    y.block_until_ready()
    dt = (time.perf_counter() - t0) / 20
    ref = down(jax.nn.silu(up(x)))
    rel = float(
        np.linalg.norm(np.asarray(y, np.float32) - np.asarray(ref, np.float32)) / np.linalg.norm(np.asarray(ref, np.float32))
    )
    backend = jaxfp4.ops.select_backend(x, fup.params()).name
    print(
        f"NVFP4 W4A16 MLP on {jax.default_backend()} via '{backend}': out {y.shape} {y.dtype}, "
        f"{dt * 1e3:.2f} ms/call, relative error vs bf16 {rel:.3f}"
    )


if __name__ == "__main__":
    main()
