"""Tensor-parallel FP4 layers on a ``jax.sharding.Mesh``.

Two Megatron-style layouts for a layer ``y = x @ W.T`` with ``W`` of shape ``(N, K)``:

* **column** parallel: ``W`` split along N (output features). Packed codes ``(N, K/2)`` and
  block scales ``(N, K/B)`` are split by rows, the global scale becomes one value per output row
  (:func:`per_row_global_scale`) split the same way, the bias too. ``x`` is replicated along the
  mesh axis; ``y`` comes out split along its last axis. Each output is computed by exactly the
  arithmetic of the unsharded layer (bit-identical).
* **row** parallel: ``W`` split along K (input features), in whole scale blocks: each shard's
  K must be a multiple of the block (16 NVFP4, 32 MXFP4), otherwise a ``ValueError`` names the
  layer. ``x`` comes split along its last axis; each device computes a float32 partial sum over
  its K range, the partials are summed across the axis (``psum``), then the bias is added once
  and the result rounded to the activation dtype. Against the unsharded layer only the float32
  summation order differs. Activation quantization (W4A4's per-16 NVFP4 blocks, W4A8's static
  FP8) is local to each element or block, so it is the same on a shard as on the whole.

Two ways to run them, same params:

* under ``jax.jit`` with the params placed by :func:`shard_params` (or loaded straight onto
  their shards with :func:`checkpoint_placement`), XLA's partitioner runs the "xla" backend as
  is;
* :func:`tp_linear` (used by :class:`jaxfp4.nn.Fp4Linear` when given a :class:`TensorParallel`)
  runs :func:`jaxfp4.fp4_linear` per shard under ``shard_map`` with explicit collectives: this is
  how the Pallas kernels (custom calls XLA cannot partition) run sharded. ``shard_params(...,
  prepare=True)`` gives each shard its own GPU kernel layout (made on the shard's device), so each
  device runs the Mosaic GPU kernel on its slice.

Layers that read the same input (q/k/v, gate/up) stay one layer under column parallelism with
their rows shard-major (:func:`fuse_columns`, :func:`shard_major` for dense weights): each device
computes its own slice of every part, and :func:`split_columns` cuts the output back into parts.
Dense layers follow the same plan through :func:`dense_specs` and XLA's partitioner.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfp4.formats import QuantizedTensor
from jaxfp4.formats.tensor import repeat_per_row, slice_rows
from jaxfp4.ops import Fp4LinearParams, concat_params, fp4_linear


class Parallel(enum.Enum):
    """How a layer is split across the mesh axis."""

    COLUMN = "column"  # split N: out features
    ROW = "row"  # split K: in features


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """A layer's placement: ``mode`` along mesh axis ``axis`` of ``mesh``."""

    mesh: Mesh
    axis: str
    mode: Parallel

    def __post_init__(self) -> None:
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"mesh has no axis {self.axis!r} (axes: {self.mesh.axis_names})")
        kind = dict(zip(self.mesh.axis_names, self.mesh.axis_types, strict=True))[self.axis]
        if kind != jax.sharding.AxisType.Auto:
            raise ValueError(
                f"mesh axis {self.axis!r} is {kind}; tensor-parallel FP4 layers need AxisType.Auto axes "
                "(jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto, ...)))"
            )

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]


def per_row_global_scale(w: QuantizedTensor) -> QuantizedTensor:
    """The same weight with one global scale per output row (``partitions = (1,) * N``).

    Exact (values are repeated, not recomputed); needed so that a row slice of the weight is a
    self-contained :class:`QuantizedTensor` whatever fused partitions it cuts through.
    """
    if w.global_scale is None or len(w.partitions) == w.n:
        return w
    return dataclasses.replace(w, global_scale=repeat_per_row(w.global_scale, w.partitions, w.n), partitions=(1,) * w.n)


def check_shardable(params: Fp4LinearParams, tp: TensorParallel, name: str = "layer") -> None:
    """Raise a ``ValueError`` naming ``name`` if ``tp`` would split a row range or a scale block."""
    n, k, bs, s = params.out_features, params.in_features, params.weight.block_size, tp.size
    if tp.mode is Parallel.COLUMN and n % s:
        raise ValueError(f"{name}: column parallelism needs N={n} divisible by the '{tp.axis}' axis size {s}")
    if tp.mode is Parallel.ROW and k % (s * bs):
        raise ValueError(
            f"{name}: row parallelism over {s} devices would split a {bs}-element scale block: "
            f"K={k} must be a multiple of {s} x {bs} = {s * bs}"
        )


def _local(params: Fp4LinearParams, tp: TensorParallel) -> Fp4LinearParams:
    """The params of one shard: the same pytree with local shapes in its static metadata."""
    w = params.weight
    if tp.mode is Parallel.COLUMN:
        n = w.n // tp.size
        w = dataclasses.replace(w, shape=(n, w.k), partitions=(1,) * n if w.global_scale is not None else (n,))
    else:
        w = dataclasses.replace(w, shape=(w.n, w.k // tp.size))
    return dataclasses.replace(params, weight=w)


def param_specs(params: Fp4LinearParams, tp: TensorParallel) -> Fp4LinearParams:
    """A pytree like ``params`` of :class:`PartitionSpec` (``params`` as :func:`shard_params` makes them)."""
    a = tp.axis
    w = params.weight
    col = tp.mode is Parallel.COLUMN
    weight = dataclasses.replace(
        w,
        codes=P(a, None) if col else P(None, a),
        scales=P(a, None) if col else P(None, a),
        global_scale=None if w.global_scale is None else (P(a) if col else P()),
    )
    kl = params.kernel_layout
    return dataclasses.replace(
        params,
        weight=weight,
        input_scale=None if params.input_scale is None else P(),
        bias=None if params.bias is None else (P(a) if col else P()),
        kernel_layout=None
        if kl is None
        else dataclasses.replace(kl, codes=P(a, None, None), scales=P(a, None, None), row_scale=P(a, None)),
    )


def _prepared(params: Fp4LinearParams, tp: TensorParallel) -> Fp4LinearParams:
    """Column: per-row global scales. A kernel layout is kept only if it is one per shard of this
    split (a layout of the whole weight is of no use to a shard)."""
    kl = params.kernel_layout
    if kl is not None and (kl.shards != tp.size or (kl.n, kl.k) != (_local(params, tp).weight.shape)):
        params = dataclasses.replace(params, kernel_layout=None)
    if tp.mode is Parallel.COLUMN:
        return dataclasses.replace(params, weight=per_row_global_scale(params.weight))
    return params


def _localize(p: Fp4LinearParams, local: Fp4LinearParams) -> Fp4LinearParams:
    """Inside ``shard_map``: local arrays under the global static metadata -> ``local``'s metadata
    (shapes of one shard), and the shard's own kernel layout out of the stacked ones."""
    w = p.weight
    weight = dataclasses.replace(local.weight, codes=w.codes, scales=w.scales, global_scale=w.global_scale)
    kl = None if p.kernel_layout is None else p.kernel_layout.shard(0)
    return dataclasses.replace(p, weight=weight, kernel_layout=kl)


def _with_shard_layouts(params: Fp4LinearParams, tp: TensorParallel) -> Fp4LinearParams:
    """Placed ``params`` plus each shard's :func:`~jaxfp4.ops.prepare_weights` layout, made on the
    device that holds the shard (no weight bytes move) and stacked along a leading axis split
    over ``tp.axis`` (:class:`~jaxfp4.ops.KernelLayout` with ``shards = tp.size``)."""
    from jaxfp4.kernels.w4a16_mgpu import CHUNK
    from jaxfp4.ops import KernelLayout, prepare_weights

    local = _local(params, tp)
    if local.weight.k % CHUNK:
        return params  # as prepare_weights: a shard's K is not a multiple of the kernel's chunk

    def one(p: Fp4LinearParams) -> tuple[jax.Array, jax.Array, jax.Array]:
        kl = prepare_weights(_localize(p, local)).kernel_layout
        return kl.codes[None], kl.scales[None], kl.row_scale[None]

    stacked = P(tp.axis, None, None)
    make = jax.shard_map(
        one,
        mesh=tp.mesh,
        in_specs=(param_specs(params, tp),),
        out_specs=(stacked, stacked, P(tp.axis, None)),
        check_vma=False,
    )
    codes, scales, row_scale = jax.jit(make)(params)
    layout = KernelLayout(codes, scales, row_scale, local.weight.n, local.weight.k, shards=tp.size)
    return dataclasses.replace(params, kernel_layout=layout)


def shard_params(
    params: Fp4LinearParams, tp: TensorParallel, name: str = "layer", *, prepare: bool | None = None
) -> Fp4LinearParams:
    """Place ``params`` on ``tp.mesh`` (column: per-row global scales, split along N; row: split along K).

    ``prepare``: give every shard its own GPU kernel layout (a :class:`~jaxfp4.ops.KernelLayout`
    with ``shards = tp.size``, what :func:`tp_linear` hands the Pallas kernel per shard);
    ``None``: when ``params`` came with a kernel layout (which, of the whole weight, is replaced)."""
    check_shardable(params, tp, name)
    prepare = params.kernel_layout is not None if prepare is None else prepare
    params = _prepared(params, tp)
    specs = param_specs(params, tp)
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(tp.mesh, s)), params, specs)
    if prepare and placed.kernel_layout is None:
        placed = _with_shard_layouts(placed, tp)
    return placed


def tp_linear(
    x: jax.Array, params: Fp4LinearParams, tp: TensorParallel, *, backend: str | None = None, name: str = "layer"
) -> jax.Array:
    """``fp4_linear`` run per shard under ``shard_map`` (see the module docstring for the maths).

    ``x``: ``[..., K]``, replicated along ``tp.axis`` (column) or split along its last axis (row);
    any other sharding is resharded by XLA at the boundary. Returns ``[..., N]`` in ``x.dtype``,
    split along the last axis (column) or replicated (row).
    """
    check_shardable(params, tp, name)
    params = _prepared(params, tp)
    specs = param_specs(params, tp)
    local = _local(params, tp)
    lead = (None,) * (x.ndim - 1)
    bias = params.bias

    if tp.mode is Parallel.COLUMN:
        f = jax.shard_map(
            lambda x, p: fp4_linear(x, _localize(p, local), backend=backend),
            mesh=tp.mesh,
            in_specs=(P(*lead, None), specs),
            out_specs=P(*lead, tp.axis),
            check_vma=False,
        )
        return f(x, params)

    def row(x, p):
        return jax.lax.psum(fp4_linear(x, _localize(p, local), backend=backend, out_dtype=jnp.float32), tp.axis)

    # check_vma=False: Pallas calls do not annotate how their outputs vary across the mesh.
    # The bias is added once, after the sum.
    specs = dataclasses.replace(specs, bias=None)
    f = jax.shard_map(row, mesh=tp.mesh, in_specs=(P(*lead, tp.axis), specs), out_specs=P(*lead, None), check_vma=False)
    y = f(x, dataclasses.replace(params, bias=None))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


# --- fused column-parallel layers and dense layers ------------------------------------------


def shard_major(arrays: Sequence[jax.Array], size: int) -> jax.Array:
    """Arrays of one layer's parts (e.g. q, k, v weights ``(N_i, ...)``) stacked along axis 0
    shard-major: ``[a_0 rows of shard 0, a_1 rows of shard 0, ..., a_0 rows of shard 1, ...]``,
    so that splitting the result evenly along axis 0 over ``size`` devices gives each device its
    own rows of every part. ``size == 1``: plain concatenation."""
    for a in arrays:
        if a.shape[0] % size:
            raise ValueError(f"a part of {a.shape[0]} rows does not split over {size} devices")
    return jnp.concatenate([a.reshape(size, a.shape[0] // size, *a.shape[1:]) for a in arrays], 1).reshape(
        -1, *arrays[0].shape[1:]
    )


def fuse_columns(parts: Sequence[Fp4LinearParams], size: int, name: str = "fused layer") -> Fp4LinearParams:
    """Quantized layers reading one input (q/k/v, gate/up) as one layer for column parallelism
    over ``size`` devices, rows shard-major (as :func:`shard_major`): each device computes its own
    slice of every part and no output moves between devices; :func:`split_columns` cuts the
    output back into the parts. Exact: each row keeps its part's global scale."""
    for p in parts:
        if p.out_features % size:
            raise ValueError(f"{name}: column parallelism needs N={p.out_features} divisible by {size}")
    pieces = []
    for i in range(size):
        for p in parts:
            rows = p.out_features // size
            weight = slice_rows(p.weight, i * rows, (i + 1) * rows)
            bias = None if p.bias is None else p.bias[i * rows : (i + 1) * rows]
            pieces.append(dataclasses.replace(p, weight=weight, bias=bias, kernel_layout=None))
    return concat_params(pieces)


def split_columns(y: jax.Array, sizes: Sequence[int], size: int) -> list[jax.Array]:
    """The parts' outputs ``[..., sizes[i]]`` of a layer fused by :func:`fuse_columns` /
    :func:`shard_major` over ``size`` devices, from its output ``y [..., sum(sizes)]``."""
    lead = y.shape[:-1]
    local = [n // size for n in sizes]
    cuts = [sum(local[: i + 1]) for i in range(len(local) - 1)]
    pieces = jnp.split(y.reshape(*lead, size, sum(local)), cuts, axis=-1)
    return [p.reshape(*lead, n) for p, n in zip(pieces, sizes, strict=True)]


def dense_specs(tp: TensorParallel, shape: tuple[int, int]) -> tuple[P, P]:
    """Partition specs of a dense ``(N, K)`` weight and its bias ``[N]`` under ``tp`` (XLA's
    partitioner runs the matmul and, for row parallelism, the sum across devices); replicated
    when the split dimension does not divide evenly (e.g. a vocabulary of 32001)."""
    dim = 0 if tp.mode is Parallel.COLUMN else 1
    if shape[dim] % tp.size:
        return P(), P()
    if tp.mode is Parallel.COLUMN:
        return P(tp.axis, None), P(tp.axis)
    return P(None, tp.axis), P()


# --- checkpoints -----------------------------------------------------------------------------

#: Llama-family layout: attention q/k/v, MLP gate/up and the LM head split along N (the LM head's
#: vocabulary: at decode it is the largest single read), o/down along K.
LLAMA_PLAN: Mapping[str, Parallel] = {
    r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)$": Parallel.COLUMN,
    r"\.(o_proj|down_proj)$": Parallel.ROW,
    r"(^|\.)lm_head$": Parallel.COLUMN,
}


def plan_mode(module: str, plan: Mapping[str, Parallel]) -> Parallel | None:
    """The first plan entry whose regex matches ``module`` (``None``: replicated)."""
    for pattern, mode in plan.items():
        if re.search(pattern, module):
            return mode
    return None


_ROLE = re.compile(r"^(?P<module>.+)\.(?P<role>weight\.codes|weight\.scales|weight\.global_scale|weight|input_scale|bias)$")


def checkpoint_placement(
    mesh: Mesh, axis: str, plan: Mapping[str, Parallel] = LLAMA_PLAN
) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """A ``place`` callable for :func:`jaxfp4.load_checkpoint`: each tensor of a module in ``plan``
    (quantized codes and scales, a dense weight, a column-parallel bias) goes straight onto its
    shards (read slice by slice from the memory-mapped file), everything else replicated.

    Global scales stay per partition here (tiny; :func:`shard_params` / :func:`tp_linear` expand
    them per row). Shapes that would split a scale block fail later, in :func:`check_shardable`.
    """
    rep = NamedSharding(mesh, P())

    def place(name: str, shape: tuple[int, ...]) -> NamedSharding:
        m = _ROLE.match(name)
        mode = plan_mode(m.group("module"), plan) if m else None
        if m is None or mode is None:
            return rep
        role = m.group("role")
        size = mesh.shape[axis]
        if role in ("weight.codes", "weight.scales") or (role == "weight" and len(shape) == 2):
            dim = 0 if mode is Parallel.COLUMN else 1
            if shape[dim] % size:
                return rep  # not splittable: check_shardable names the layer when it is used
            return NamedSharding(mesh, P(axis, None) if dim == 0 else P(None, axis))
        if role == "bias" and mode is Parallel.COLUMN and shape[0] % size == 0:
            return NamedSharding(mesh, P(axis))
        return rep

    return place
