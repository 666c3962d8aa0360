"""NVFP4 activation quantize-dequantize (vLLM mode) in one Pallas kernel (Triton lowering).

What the W4A4 recipe does to activations before its GEMM: per 16-element block along K, the
E4M3 block scale from the block's absolute maximum and the static global divisor, E2M1 codes
(round half to even), then ``x_dq = dtype(q * f32(SF / g))``. Under XLA that takes several
kernels (the block maximum, the per-block scale arithmetic behind optimization barriers, the
elementwise pass), each reading or writing the activations; here one kernel reads each block of
``x`` once and writes ``x_dq`` once.

The arithmetic is the reference's own function (:func:`jaxfp4.formats.activations
.fake_quantize_nvfp4_activations`), traced inside the kernel with ``KERNEL_OPS``: IEEE division
as the backend's quotient corrected exactly with integer arithmetic, and no optimization
barriers (they exist to stop XLA's algebraic simplifier, which does not run inside a kernel).
So codes, scales and ``x_dq`` are bit-identical to the "xla" path (``tests/kernels``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxfp4.formats.activations import KERNEL_OPS, NVFP4_BLOCK, _check_act, fake_quantize_nvfp4_activations
from jaxfp4.formats.tensor import ActivationQuant


def blocks(m: int, k: int, programs: int = 512) -> tuple[int, int]:
    """Rows and columns per program ``(bm, bk)``: ``bm`` = 1 below 64 rows, else 8; ``bk`` the
    largest power of two ``<= 1024`` dividing ``k`` (at least one 16-element block), halved down
    to 128 while there are fewer than ``programs`` programs (the arithmetic per element is long,
    so a small M needs many programs: on the H100, 8 x 1024 blocks took 6.1 us at M = 16 where
    the XLA path took 6.3)."""
    bm = 1 if m < 64 else 8
    bk = NVFP4_BLOCK
    while bk * 2 <= 1024 and k % (bk * 2) == 0:
        bk *= 2
    while bk > 128 and -(-m // bm) * (k // bk) < programs:
        bk //= 2
    return bm, bk


@functools.partial(jax.jit, static_argnames=("interpret",))
def fake_quantize_nvfp4_vllm(x: jax.Array, global_scale: jax.Array, *, interpret: bool = False) -> jax.Array:
    """``fake_quantize_nvfp4_activations(x, global_scale, mode=VLLM)`` for ``x`` ``(M, K)``
    (bf16, fp16 or float32; ``K % 16 == 0``) in one kernel; ``global_scale`` the float32 divisor
    ``g`` (a scalar or shape ``(1,)``). Rows past ``M`` in the last program are masked."""
    _check_act(x, NVFP4_BLOCK)  # of the whole K: each program sees only its own block
    m, k = x.shape
    bm, bk = blocks(m, k)
    g = jnp.asarray(global_scale, jnp.float32).reshape(1)

    def kernel(x_ref, g_ref, o_ref):
        o_ref[...] = fake_quantize_nvfp4_activations(x_ref[...], g_ref[0], mode=ActivationQuant.VLLM, ops=KERNEL_OPS)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(m, bm), k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j)), pl.BlockSpec((1,), lambda i, j: (0,))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(x, g)
