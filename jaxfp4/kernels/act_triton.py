"""Activation quantization in one Pallas kernel each (Triton lowering), bit-identical to the
"xla" path: NVFP4 quantize-dequantize (W4A4, vLLM mode) and the values of static FP8 codes
(MXFP4 W4A8).

Under XLA each takes several kernels (block maxima, per-block scale arithmetic behind
optimization barriers, the exact division, the elementwise passes), each reading or writing
the activations; here one kernel reads each block of ``x`` once and writes its result once.

The arithmetic is the reference's own functions (:mod:`jaxfp4.formats.activations`), traced
inside the kernel with ``KERNEL_OPS``: IEEE division as the backend's quotient corrected exactly
with integer arithmetic, and no optimization barriers (they exist to stop XLA's algebraic
simplifier, which does not run inside a kernel). So codes, scales and outputs are bit-identical
to the "xla" path (``tests/kernels/test_act_triton.py``).

* :func:`fake_quantize_nvfp4_vllm`: per 16-element block along K, the E4M3 block scale from the
  block's absolute maximum and the static global divisor, E2M1 codes (round half to even), then
  ``x_dq = dtype(q * f32(SF / g))``.
* :func:`fp8_static_values`: ``bf16(e4m3(x / s))``, the values of the FP8 codes of
  :func:`~jaxfp4.formats.activations.quantize_fp8_static` (exact in bf16), what the Mosaic GPU
  kernel multiplies for W4A8 (the scale ``s`` goes to its epilogue). Under XLA: the quotient,
  the FP8 cast and the decoding from the code's bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxfp4.formats import codecs
from jaxfp4.formats.activations import (
    KERNEL_OPS,
    NVFP4_BLOCK,
    _check_act,
    fake_quantize_nvfp4_activations,
    quantize_fp8_static,
)
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


def _blockwise(
    fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, scale: jax.Array, out_dtype, interpret: bool
) -> jax.Array:
    """``fn(x_block, scale)`` over the ``(bm, bk)`` blocks of ``x`` (:func:`blocks`), one program
    each; ``scale`` a float32 scalar or ``(1,)``. Rows past ``M`` in the last program are masked."""
    m, k = x.shape
    bm, bk = blocks(m, k)
    s = jnp.asarray(scale, jnp.float32).reshape(1)

    def kernel(x_ref, s_ref, o_ref):
        o_ref[...] = fn(x_ref[...], s_ref[0]).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
        grid=(pl.cdiv(m, bm), k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j)), pl.BlockSpec((1,), lambda i, j: (0,))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(x, s)


@functools.partial(jax.jit, static_argnames=("interpret",))
def fake_quantize_nvfp4_vllm(x: jax.Array, global_scale: jax.Array, *, interpret: bool = False) -> jax.Array:
    """``fake_quantize_nvfp4_activations(x, global_scale, mode=VLLM)`` for ``x`` ``(M, K)``
    (bf16, fp16 or float32; ``K % 16 == 0``) in one kernel; ``global_scale`` the float32 divisor
    ``g`` (a scalar or shape ``(1,)``)."""
    _check_act(x, NVFP4_BLOCK)  # of the whole K: each program sees only its own block

    def fn(xb: jax.Array, g: jax.Array) -> jax.Array:
        return fake_quantize_nvfp4_activations(xb, g, mode=ActivationQuant.VLLM, ops=KERNEL_OPS)

    return _blockwise(fn, x, global_scale, x.dtype, interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def fp8_static_values(x: jax.Array, input_scale: jax.Array, *, interpret: bool = False) -> jax.Array:
    """bf16 ``(M, K)``: the values of ``quantize_fp8_static(x, input_scale)``'s E4M3 codes (exact
    in bf16; NaN stays NaN) for ``x`` ``(M, K)`` (bf16, fp16 or float32; ``K % 16 == 0``), in
    one kernel; ``input_scale`` the float32 multiplier ``s`` (``x ~ fp8 * s``; a scalar or ``(1,)``)."""
    _check_act(x, NVFP4_BLOCK)  # the kernel's blocking (any MXFP4 K is a multiple of 32)

    def fn(xb: jax.Array, s: jax.Array) -> jax.Array:
        return codecs.decode_e4m3(quantize_fp8_static(xb, s, ops=KERNEL_OPS))

    return _blockwise(fn, x, input_scale, jnp.bfloat16, interpret)
