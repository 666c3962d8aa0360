"""``load_checkpoint``: a PyTorch FP4 checkpoint directory -> JAX pytrees, checked, streamed.

The one converter. Producers (``producers/``) declare layouts as data; this module reads every
producer through them, in two phases, so that nothing half-loaded is ever returned:

1. **Headers only.** Parse ``config.json`` (+ ``hf_quant_config.json``), the shard index and every
   shard's header; group tensors into modules by the producer's layout; check every dtype and
   shape. All problems are collected into one :class:`LoadReport` and raised together.
2. **Data.** Read one tensor at a time from the memory map, check its values (NaN / Inf / zero /
   negative global scales, NaN or negative E4M3 block scales, E8M0 ``0xFF``), normalize the
   activation scale's convention, and place it (``jax.device_put``) on its device or sharding.
   Host memory holds one tensor beyond the result at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.checkpoint.errors import CheckpointError, LoadReport
from jaxfp4.checkpoint.layouts import QUANT_SUFFIXES, Group, Layout, Plan
from jaxfp4.checkpoint.producers import PRODUCERS
from jaxfp4.checkpoint.safetensors_io import SafetensorsFile, TensorInfo
from jaxfp4.formats import MXFP4W4A8, NVFP4W4A4, ActivationQuant, FP4Format, GlobalScale, QuantizedTensor
from jaxfp4.ops.params import Fp4LinearParams

Placement = jax.Device | jax.sharding.Sharding | None
#: ``place(name, shape) -> device or sharding``; ``name`` is a dense key or ``"<module>.weight.codes"``,
#: ``".weight.scales"``, ``".weight.global_scale"``, ``".input_scale"``, ``".bias"``.
PlaceFn = Callable[[str, tuple[int, ...]], Placement]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
      path: the directory.
      config: ``config.json`` as a dict.
      producer: ``"compressed-tensors"``, ``"modelopt"``, ``"quark"`` or ``"gpt-oss"``.
      description: the detected scheme, in words.
      quantized: module path (``"model.layers.0.mlp.down_proj"``) -> :class:`Fp4LinearParams`
        (weight, recipe, normalized activation scale, bias), accepted by ``jaxfp4.dequantize``
        and ``jaxfp4.fp4_linear``.
      dense: every other tensor, by its full key (``"model.embed_tokens.weight"``), in its stored dtype.
      report: what the load saw (``unexpected`` tensors were left out).
    """

    path: str
    config: dict
    producer: str
    description: str
    quantized: dict[str, Fp4LinearParams]
    dense: dict[str, jax.Array]
    report: LoadReport

    def __getitem__(self, key: str) -> Fp4LinearParams | jax.Array:
        if key in self.quantized:
            return self.quantized[key]
        if key in self.dense:
            return self.dense[key]
        raise KeyError(f"{key!r} is neither a quantized module nor a dense tensor of {self.path}")

    def __contains__(self, key: str) -> bool:
        return key in self.quantized or key in self.dense


@dataclasses.dataclass
class _Module:
    """Phase-1 result for one quantized module: where each role's tensor lives."""

    name: str
    group: Group
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]]
    n: int = 0
    k: int = 0
    experts: int = 0


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except FileNotFoundError:
        raise CheckpointError("not found", file=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not valid JSON: {e}", file=path) from None
    if not isinstance(out, dict):
        raise CheckpointError("not a JSON object", file=path)
    return out


def _weight_files(path: str, report: LoadReport) -> tuple[list[str], dict[str, str] | None]:
    """The shard files to read and the index's ``weight_map`` (``None`` without an index)."""
    names = sorted(os.listdir(path))
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        index = _read_json(index_path)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError("has no 'weight_map' of tensor -> shard file", file=index_path)
        shards = sorted(set(wm.values()))
        for shard in shards:
            if os.path.basename(shard) != shard:
                raise CheckpointError(
                    f"shard name {shard!r} is not a file name in the checkpoint directory", file=index_path
                )
            if not os.path.exists(os.path.join(path, shard)):
                first = next(k for k, v in wm.items() if v == shard)
                report.missing.append((index_path, first, f"the index names shard {shard!r}, which does not exist"))
        return [os.path.join(path, s) for s in shards if os.path.exists(os.path.join(path, s))], wm
    if "model.safetensors" in names:
        return [os.path.join(path, "model.safetensors")], None
    st = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
    if st:
        return st, None
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"only pickled weights ({', '.join(pickles)}) found; jaxfp4 never unpickles (arbitrary code "
            "execution). Convert them to safetensors first.",
            file=os.path.join(path, pickles[0]),
        )
    raise CheckpointError("no *.safetensors files", file=path)


def _open_all(
    files: list[str], wm: dict[str, str] | None, path: str, report: LoadReport
) -> dict[str, tuple[SafetensorsFile, TensorInfo]]:
    where: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    for fpath in files:
        sf = SafetensorsFile(fpath)
        for name, info in sf.tensors.items():
            if name in where:
                report.mismatched.append((fpath, name, f"duplicate key: also in {where[name][0].path}"))
                continue
            if wm is not None and wm.get(name) != os.path.basename(fpath):
                if name not in wm:
                    report.unexpected.append((fpath, name, "not listed in the index"))
                    continue
                report.mismatched.append((fpath, name, f"the index puts it in {wm[name]!r}"))
                continue
            where[name] = (sf, info)
    if wm is not None:
        present = {os.path.basename(f) for f in files}
        for name, shard in wm.items():
            if name not in where and shard in present:
                report.missing.append((os.path.join(path, shard), name, "listed in the index but not in its shard"))
    return where


def _detect(path: str) -> tuple[dict, dict | None, object]:
    config_path = os.path.join(path, "config.json")
    config = _read_json(config_path)
    hq_path = os.path.join(path, "hf_quant_config.json")
    hf_quant = _read_json(hq_path) if os.path.exists(hq_path) else None
    qc = config.get("quantization_config")
    if qc is None and hf_quant is None:
        raise CheckpointError("has no quantization_config: not a quantized checkpoint", file=config_path)
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError("quantization_config is not an object", file=config_path)
    found = [p for p in PRODUCERS if p.detect(config, hf_quant)]
    if not found:
        method = (qc or {}).get("quant_method")
        known = "compressed-tensors, modelopt, quark, mxfp4 (gpt-oss)"
        raise CheckpointError(f"unknown quant_method {method!r}; supported: {known}", file=config_path)
    if len(found) > 1:
        raise CheckpointError(
            f"config matches several producers ({[p.NAME for p in found]}): conventions mixed", file=config_path
        )
    return config, hf_quant, found[0]


def _discover(
    plan: Plan, where: dict[str, tuple[SafetensorsFile, TensorInfo]], report: LoadReport
) -> tuple[list[_Module], set[str]]:
    """Group keys into quantized modules; return them and the set of consumed keys."""
    layouts = {g.layout for g in plan.groups}
    candidates: dict[str, None] = {}
    for key, (_, info) in where.items():
        for lay in layouts:
            for suffix in (lay.codes, lay.scales):
                tail = lay.sep + suffix
                if not key.endswith(tail):
                    continue
                if suffix == "weight" and info.dtype != "U8":
                    continue  # a dense weight
                candidates[key[: -len(tail)]] = None
    modules, consumed = [], set()
    for name in candidates:
        group = plan.group_for(name)
        lay = group.layout if group else next(iter(layouts))
        present = {role: lay.key(name, s) for role, s in lay.roles().items() if lay.key(name, s) in where}
        consumed.update(present.values())
        if plan.ignored(name):
            problem = f"module {name!r} is in the config's ignore list but stored quantized"
        elif group is None:
            problem = f"module {name!r} matches no config group"
        else:
            modules.append(_Module(name, group, {role: where[k] for role, k in present.items()}))
            continue
        report.mismatched.extend((where[k][0].path, k, problem) for k in present.values())
    return modules, consumed


def _check_shapes(m: _Module, report: LoadReport) -> None:
    """Phase 1 for one module: presence, dtypes and shapes, from the headers alone."""
    lay: Layout = m.group.layout
    bs = lay.format.block_size
    needed = [role for role in lay.roles() if role != "bias"]
    any_file = next(iter(m.tensors.values()))[0].path
    bad = lambda role, why: report.mismatched.append((m.tensors[role][0].path, m.tensors[role][1].name, why))
    for role in needed:
        if role not in m.tensors:
            report.missing.append(
                (
                    any_file,
                    lay.key(m.name, lay.roles()[role]),
                    f"{lay.producer} {lay.format.value} module {m.name!r} needs its {role.replace('_', ' ')}",
                )
            )
    if any(r not in m.tensors for r in needed):
        return
    codes = m.tensors["codes"][1]
    if codes.dtype != "U8":
        return bad("codes", f"packed E2M1 codes must be U8, got {codes.dtype}")
    if lay.experts:
        if len(codes.shape) != 4 or codes.shape[3] != bs // 2:
            return bad("codes", f"gpt-oss blocks must be [E, N, K/{bs}, {bs // 2}], got {list(codes.shape)}")
        m.experts, m.n, m.k = codes.shape[0], codes.shape[1], codes.shape[2] * bs
    else:
        if len(codes.shape) != 2:
            return bad("codes", f"packed codes must be [N, K/2], got {list(codes.shape)}")
        m.n, m.k = codes.shape[0], codes.shape[1] * 2
    if m.k % bs:
        return bad("codes", f"K={m.k} is not a multiple of the {lay.format.value} block ({bs})")
    lead_shape = (m.experts,) if lay.experts else ()
    scales = m.tensors["scales"][1]
    if scales.dtype not in lay.scale_dtypes:
        bad("scales", f"{lay.format.value} block scales must be {' or '.join(lay.scale_dtypes)}, got {scales.dtype}")
    elif scales.shape != (*lead_shape, m.n, m.k // bs):
        bad("scales", f"block scales have shape {list(scales.shape)}, expected {[*lead_shape, m.n, m.k // bs]} for K={m.k}")
    for role in ("global_scale", "input_scale"):
        if role not in m.tensors:
            continue
        info = m.tensors[role][1]
        ok_dtypes = ("F32",) if role == "global_scale" else lay.input_dtypes
        if info.dtype not in ok_dtypes:
            bad(role, f"{role.replace('_', ' ')} must be {' or '.join(ok_dtypes)}, got {info.dtype}")
        elif math.prod(info.shape) != 1 or len(info.shape) > 1:
            bad(role, f"{role.replace('_', ' ')} must be one value (shape [] or [1]), got {list(info.shape)}")
    if "bias" in m.tensors:
        info = m.tensors["bias"][1]
        if info.dtype not in ("BF16", "F16", "F32"):
            bad("bias", f"bias must be BF16, F16 or F32, got {info.dtype}")
        elif info.shape != (*lead_shape, m.n):
            bad("bias", f"bias has shape {list(info.shape)}, expected {[*lead_shape, m.n]}")


def _check_values(m: _Module, role: str, a: np.ndarray) -> str | None:
    """Phase 2 value checks; returns the problem or ``None``."""
    lay = m.group.layout
    if role == "scales":
        b = a.view(np.uint8)
        if lay.format is FP4Format.NVFP4:
            if np.any((b & 0x7F) == 0x7F):
                return "E4M3 block scale is NaN"
            if np.any(b & 0x80):
                return "E4M3 block scale is negative"
        elif np.any(b == 0xFF):
            return "E8M0 block scale 0xFF (NaN)"
    elif role in ("global_scale", "input_scale"):
        v = float(np.asarray(a, np.float32).reshape(()))
        if not math.isfinite(v) or v <= 0:
            return f"{role.replace('_', ' ')} is {v}: must be finite and > 0"
    return None


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, nbytes: int) -> None:
        self.done += nbytes
        if self.enabled:
            pct = 100.0 * self.done / max(self.total, 1)
            bar = "#" * int(pct // 4)
            print(f"\rjaxfp4: loading [{bar:<25}] {pct:5.1f}% of {self.total / 2**20:.1f} MiB", end="", file=sys.stderr)
            if self.done >= self.total:
                print(file=sys.stderr)


def _placer(place: Placement | PlaceFn) -> Callable[[str, np.ndarray], jax.Array]:
    def put(name: str, a: np.ndarray) -> jax.Array:
        target = place(name, a.shape) if callable(place) and not isinstance(place, jax.Device) else place
        if target is None:
            return jnp.asarray(a)
        if isinstance(target, jax.sharding.Sharding) and not target.is_fully_replicated:
            # Each device reads only its own slice of the memory-mapped file: no full host copy.
            return jax.make_array_from_callback(a.shape, target, lambda idx: np.ascontiguousarray(a[idx]))
        return jax.device_put(np.asarray(a, order="C"), target)

    return put


def _expert_slices(m: _Module) -> Iterator[tuple[str, int | None]]:
    if not m.group.layout.experts:
        yield m.name, None
        return
    parent, _, leaf = m.name.rpartition(".")
    for e in range(m.experts):
        yield f"{parent}.{e}.{leaf}", e


def _build(m: _Module, put, progress: _Progress) -> dict[str, Fp4LinearParams]:
    lay, recipe = m.group.layout, m.group.recipe
    host = {}
    for role, (sf, info) in m.tensors.items():
        a = sf.read(info.name)
        why = _check_values(m, role, a)
        if why is not None:
            raise CheckpointError(why, file=sf.path, tensor=info.name)
        host[role] = a
        progress.step(info.nbytes)
    out = {}
    for name, e in _expert_slices(m):
        pick = (lambda a: a) if e is None else (lambda a, e=e: a[e])
        codes = pick(host["codes"]).reshape(m.n, m.k // 2)
        scales = pick(host["scales"])
        scales = scales.view(np.uint8) if lay.format is FP4Format.MXFP4 else scales
        gs = None
        if lay.global_scale:
            gs = put(f"{name}.weight.global_scale", np.asarray(host["global_scale"], np.float32).reshape(1))
        weight = QuantizedTensor(
            codes=put(f"{name}.weight.codes", codes),
            scales=put(f"{name}.weight.scales", scales),
            global_scale=gs,
            format=lay.format,
            shape=(m.n, m.k),
            partitions=(m.n,),
            global_kind=lay.global_kind,
            negative_zero=lay.negative_zero,
        )
        input_scale = None
        if isinstance(recipe, NVFP4W4A4 | MXFP4W4A8):
            v = np.float32(np.asarray(host["input_scale"]).astype(np.float32).reshape(()))
            # W4A4 wants the activation global *divisor*; W4A8 the FP8 *multiplier*. One IEEE
            # float32 reciprocal converts (what vLLM does when it loads ModelOpt / Quark scales).
            wants = GlobalScale.DIVISOR if isinstance(recipe, NVFP4W4A4) else GlobalScale.MULTIPLIER
            if lay.input_kind is not wants:
                v = np.float32(1.0) / v
            input_scale = put(f"{name}.input_scale", np.asarray(v, np.float32).reshape(()))
        bias = put(f"{name}.bias", pick(host["bias"])) if "bias" in host else None
        out[name] = Fp4LinearParams(weight=weight, input_scale=input_scale, bias=bias, recipe=recipe).validate(name)
    return out


def load_checkpoint(
    path: str | os.PathLike,
    *,
    place: Placement | PlaceFn = None,
    weight_only: bool = False,
    activation_mode: ActivationQuant = ActivationQuant.VLLM,
    progress: bool | None = None,
) -> Checkpoint:
    """Load an FP4 checkpoint directory made by compressed-tensors, ModelOpt, Quark or gpt-oss.

    Args:
      path: directory with ``config.json`` (+ ``hf_quant_config.json`` for ModelOpt) and
        ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
      place: where arrays go as they are read: ``None`` (JAX's default device), a device, a
        sharding, or ``place(name, shape)`` returning one per tensor (see :data:`PlaceFn`).
      weight_only: run every quantized module with its weight format's W4A16 recipe (what
        vLLM's Marlin path does on Hopper); also the way to load MXFP4 W4A4 checkpoints.
      activation_mode: NVFP4 W4A4 runtime activation quantization: ``VLLM`` (vLLM's emulation,
        what serving computes) or ``COMPRESSED_TENSORS`` (what HF transformers computes).
      progress: print a progress bar to stderr; ``None``: when there are several shards and
        stderr is a terminal.

    Returns:
      A :class:`Checkpoint`. Tensors of quantized modules are normalized: W4A4 ``input_scale``
      is the activation global divisor, W4A8 ``input_scale`` the FP8 multiplier; weight global
      scales stay in the producer's convention (:class:`~jaxfp4.GlobalScale`) so that
      ``dequantize`` is bit-exact with the producer.

    Raises:
      CheckpointError: (a ``ValueError``) naming the file and the tensor, for any malformed or
        unsupported input, with the whole load report attached as ``.report``; pickled
        ``.bin``/``.pt`` checkpoints are refused without being opened.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError("not a checkpoint directory", file=path)
    report = LoadReport()
    config, hf_quant, producer = _detect(path)
    try:
        plan = producer.plan(config, hf_quant, weight_only=weight_only, activation_mode=activation_mode)
    except CheckpointError as e:
        raise e.at(file=os.path.join(path, "config.json")) from None
    files, wm = _weight_files(path, report)
    where = _open_all(files, wm, path, report)
    modules, consumed = _discover(plan, where, report)
    for m in modules:
        _check_shapes(m, report)
    dense_keys = []
    for key, (sf, _) in where.items():
        if key in consumed:
            continue
        if key.rpartition(".")[2] in QUANT_SUFFIXES or key.rpartition("_")[2] in ("blocks", "scales"):
            report.mismatched.append(
                (
                    sf.path,
                    key,
                    f"a quantization tensor outside any {plan.producer} module layout (producer conventions mixed?)",
                )
            )
            continue
        dense_keys.append(key)
    report.raise_if_fatal()

    put = _placer(place)
    total = sum(info.nbytes for _, info in where.values())
    show = progress if progress is not None else (len(files) > 1 and sys.stderr.isatty())
    bar = _Progress(total, bool(show))
    quantized: dict[str, Fp4LinearParams] = {}
    for m in modules:
        quantized.update(_build(m, put, bar))
    dense = {}
    for key in dense_keys:
        sf, info = where[key]
        dense[key] = put(key, sf.read(key))
        bar.step(info.nbytes)
    for sf in {sf for sf, _ in where.values()}:
        sf.close()
    return Checkpoint(path, config, plan.producer, plan.description, quantized, dense, report)
