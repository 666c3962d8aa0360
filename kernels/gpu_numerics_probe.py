"""Probe: are the formats codecs bit-exact on the GPU backend as on the CPU backend?

Runs each codec on random inputs on GPU and CPU (both XLA backends on the GPU machine) and
prints the number of mismatching bit patterns. Used to diagnose GPU-vs-CPU numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats import (
    ActivationQuant,
    codecs,
    fake_quantize_nvfp4_activations,
    quantize_nvfp4_activations,
)


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def run(fn, *args):
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    out = []
    for d in (gpu, cpu):
        with jax.default_device(d):
            out.append(jax.jit(fn)(*[jax.device_put(a, d) for a in args]))
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 1024)) * rng.uniform(0, 3, (512, 1))).astype(np.float32)
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    probes = {
        "div_exact": lambda a: codecs.div_exact(a, jnp.float32(6.0)),
        "encode_e4m3": lambda a: codecs.encode_e4m3(a * 100),
        "encode_e2m1": lambda a: codecs.encode_e2m1(a * 3),
        "f32_to_bf16": lambda a: a.astype(jnp.bfloat16),
        "div_plain": lambda a: a / 6.0,
        "div_array": lambda a: a / (jnp.abs(a[::-1]) + 1.0),
        "div_barrier_both": lambda a: jax.lax.optimization_barrier(a) / jax.lax.optimization_barrier(jnp.full_like(a, 6.0)),
    }
    for name, f in probes.items():
        g, c = run(f, jnp.asarray(x))
        print(f"{name:14s} mismatches {(bits(g) != bits(c)).sum()} / {np.asarray(g).size}")
    b = (np.abs(x[::-1]) + np.float32(0.37)).astype(np.float32)
    with jax.default_device(jax.devices("gpu")[0]):
        g = np.asarray(jax.jit(codecs.div_exact)(jnp.asarray(x), jnp.asarray(b)))
        g6 = np.asarray(jax.jit(lambda a: codecs.div_exact(a, jnp.float32(6.0)))(jnp.asarray(x)))
    print(
        "div_exact on GPU vs IEEE numpy:",
        (bits(g) != bits(x / b)).sum(),
        (bits(g6) != bits(x / np.float32(6))).sum(),
    )
    for mode in ActivationQuant:
        g, c = run(lambda a, mode=mode: quantize_nvfp4_activations(a, jnp.float32(644.0), mode=mode), xb)
        print(
            f"act codes {mode.value:20s} codes {(bits(g[0]) != bits(c[0])).sum()} scales {(bits(g[1]) != bits(c[1])).sum()}"
        )
        g, c = run(lambda a, mode=mode: fake_quantize_nvfp4_activations(a, jnp.float32(644.0), mode=mode), xb)
        print(f"act x_dq  {mode.value:20s} {(bits(g) != bits(c)).sum()} / {g.size}")
        sc = jnp.asarray(x[:, :64] * 644 / 6)
        g, c = run(lambda a: codecs.encode_e4m3(a), sc)
        print(f"e4m3 of scales: {(bits(g) != bits(c)).sum()}")


if __name__ == "__main__":
    main()
