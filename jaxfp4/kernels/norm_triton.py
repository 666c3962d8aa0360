"""Residual add + RMSNorm (HF ``LlamaRMSNorm``) in one Pallas kernel (Triton lowering).

Between two linear layers a Llama decode step does ``h = x + delta`` (the residual stream) and
``y = w * rmsnorm(h)``. Under XLA that is three kernels on the GPU (the add, fused with whatever
produced ``delta``; the float32 sum of squares; the normalization and the weight), each moving a
few kilobytes at decode, so their launches and the gaps between them cost more than their work.
This kernel does all of it for one row per program, reading ``x`` and ``delta`` once:

* ``h = x + delta`` rounded to the activation dtype (PyTorch's bf16/fp16 add);
* ``y = w.astype(dtype) * (h32 * rsqrt(mean(h32 ** 2) + eps)).astype(dtype)``, ``h32`` the
  float32 of ``h``: HF's arithmetic, with both roundings to the activation dtype.

``delta`` may also be a split-K linear layer's output before its sum (:class:`jaxfp4.ops.SplitKSum`,
from :func:`jaxfp4.ops.fp4_linear_deferred` at decode shapes): the program then adds its token's
float32 partials (contiguous rows) in split order, multiplies by the row multipliers and rounds,
the operations of :meth:`SplitKSum.resolve` in its order (so ``delta`` and ``h`` are bit-equal to
the unsummed path's), which saves the kernel XLA would run for that sum.

:func:`jaxfp4.models.llama.add_rms_norm` is its jnp twin. ``h`` is bit-equal to it. ``y``
differs only through the order of the float32 sum of squares and the GPU's ``rsqrt`` (an
approximation within a couple of float32 ulps): the factor moves by a few float32 ulps, which
moves a bf16/fp16 result by an ulp where the float32 product lies next to a rounding boundary
(``tests/kernels/test_norm_triton.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxfp4.ops.pallas import SplitKSum

#: Activation dtypes the kernel takes.
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# Warps of a program that sums split-K partials: its row's loads are 4-8x the plain kernel's, and
# more warps keep more of them in flight. CUPTI on the H100 (kernels/probe_norm_split.py, results
# norm-split-probe-*.json, session 20), 4096 wide, 1 row, 4 splits: 3.26 us with 4 warps, 2.69 / 2.40
# / 2.02 with 8 / 16 / 32, against 2.85 for XLA's sum and the kernel on its output.
SPLIT_NUM_WARPS = 32


def supported(hidden: int, dtype: jnp.dtype) -> bool:
    """Whether :func:`add_rms_norm` runs rows of ``hidden`` values of ``dtype`` (one row per
    program, held in registers: up to 32768 values)."""
    return jnp.dtype(dtype) in DTYPES and 0 < hidden <= 32768


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(
    x: jax.Array,
    delta: jax.Array | SplitKSum | None,
    weight: jax.Array,
    *,
    eps: float,
    num_warps: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``h = x + delta`` and ``y = RMSNorm(h) * weight`` in one kernel, one program per row.

    Args:
      x: ``[..., hidden]`` bf16 or fp16 (the residual stream).
      delta: the same shape and dtype (what a layer adds to it), or that as a
        :class:`~jaxfp4.ops.SplitKSum` (summed here), or None: ``h = x``.
      weight: ``(hidden,)``, any float dtype (cast to ``x``'s, as HF's ``weight * h.to(dtype)``
        multiplies in the activation dtype).
      eps: the variance epsilon (``rms_norm_eps``).
      num_warps: warps per program; None: 4, or 32 when it sums a ``SplitKSum``
        (:data:`SPLIT_NUM_WARPS`).

    Returns:
      ``(h, y)``, both ``x``'s shape and dtype.
    """
    *lead, hid = x.shape
    dt = x.dtype
    if not supported(hid, dt):
        raise ValueError(f"add_rms_norm: unsupported rows of {hid} {dt} (bf16/fp16, at most 32768)")
    if delta is not None and (tuple(delta.shape) != x.shape or jnp.dtype(delta.dtype) != dt):
        what = "split-K delta" if isinstance(delta, SplitKSum) else "delta"
        raise ValueError(f"add_rms_norm: {what} {tuple(delta.shape)} {delta.dtype} does not match x {x.shape} {dt}")
    if weight.shape != (hid,):
        raise ValueError(f"add_rms_norm: weight {weight.shape} is not ({hid},)")
    rows = 1
    for d in lead:
        rows *= d
    width = 1 << (hid - 1).bit_length()  # the program's block: a power of two, masked past hid
    if isinstance(delta, SplitKSum) and delta.parts.shape[2] < width:  # padded rows short of the block
        delta = delta.resolve()
    split = isinstance(delta, SplitKSum)
    f32 = jnp.float32
    x2 = x.reshape(rows, hid)
    if split:
        operands = (x2, delta.parts, delta.row_scale)
    else:
        operands = (x2,) if delta is None else (x2, delta.reshape(rows, hid))

    def kernel(*refs):
        ins, w_ref, outs = refs[: len(operands)], refs[len(operands)], refs[len(operands) + 1 :]
        r = pl.program_id(0)
        live = jnp.arange(width) < hid
        row = lambda ref: pl_triton.load(ref.at[r, pl.ds(0, width)], mask=live, other=0)
        h = row(ins[0])
        if split:  # SplitKSum.resolve: token r's partial rows in split order, times row_scale, rounded
            part = lambda i: pl_triton.load(ins[1].at[jnp.int32(i), r, pl.ds(0, width)], mask=live, other=0)
            acc = part(0)
            for i in range(1, delta.parts.shape[0]):
                acc = acc + part(i)
            d = (acc * pl_triton.load(ins[2].at[pl.ds(0, width)], mask=live, other=0)).astype(dt)
            h = (h.astype(f32) + d.astype(f32)).astype(dt)  # one rounding: the dtype's add
            pl_triton.store(outs[0].at[r, pl.ds(0, width)], h, mask=live)
        elif delta is not None:
            h = (h.astype(f32) + row(ins[1]).astype(f32)).astype(dt)  # one rounding: the dtype's add
            pl_triton.store(outs[0].at[r, pl.ds(0, width)], h, mask=live)
        hf = h.astype(f32)
        ms = jnp.sum(hf * hf) / f32(hid)
        yn = (hf * jax.lax.rsqrt(ms + f32(eps))).astype(dt)
        w = pl_triton.load(w_ref.at[pl.ds(0, width)], mask=live, other=0).astype(dt)
        pl_triton.store(outs[-1].at[r, pl.ds(0, width)], (w.astype(f32) * yn.astype(f32)).astype(dt), mask=live)

    whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
    out = jax.ShapeDtypeStruct((rows, hid), dt)
    n_out = 1 if delta is None else 2
    res = pl.pallas_call(
        kernel,
        out_shape=(out,) * n_out,
        grid=(rows,),
        in_specs=[whole(a) for a in (*operands, weight)],
        out_specs=(whole(out),) * n_out,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps or (SPLIT_NUM_WARPS if split else 4), num_stages=1),
        interpret=interpret,
    )(*operands, weight)
    h = x2 if delta is None else res[0]
    return h.reshape(x.shape), res[-1].reshape(x.shape)
