"""compressed-tensors / llm-compressor: ``nvfp4-pack-quantized`` (W4A4, W4A16) and ``mxfp4-pack-quantized``.

Tensors per module (compressed-tensors 0.19): ``weight_packed`` U8 ``[N, K/2]``; ``weight_scale``
F8_E4M3 ``[N, K/16]`` (NVFP4) or U8 E8M0 ``[N, K/32]`` (MXFP4); ``weight_global_scale`` F32 ``[1]``,
a **divisor** (~ 448*6/amax); W4A4 also ``input_global_scale`` F32 ``[1]``, a divisor.
"""

from __future__ import annotations

import dataclasses

from jaxfp4.checkpoint.errors import CheckpointError
from jaxfp4.checkpoint.layouts import Group, Layout, Plan, everything, exact_or_regex
from jaxfp4.formats import MXFP4W4A16, NVFP4W4A4, NVFP4W4A16, ActivationQuant, FP4Format, GlobalScale

NAME = "compressed-tensors"

NVFP4_LAYOUT = Layout(
    producer=NAME,
    format=FP4Format.NVFP4,
    codes="weight_packed",
    scales="weight_scale",
    global_scale="weight_global_scale",
    global_kind=GlobalScale.DIVISOR,
)
NVFP4_W4A4_LAYOUT = dataclasses.replace(NVFP4_LAYOUT, input_scale="input_global_scale", input_kind=GlobalScale.DIVISOR)
MXFP4_LAYOUT = Layout(producer=NAME, format=FP4Format.MXFP4, codes="weight_packed", scales="weight_scale")


def detect(config: dict, hf_quant: dict | None) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def _targets(targets: list[str]):
    # A target without a dot that is not a regex is a module class name ("Linear"): it selects
    # every module stored quantized. Anything else is a module name or a regex.
    if any(not t.startswith("re:") and "." not in t and t[:1].isupper() for t in targets):
        return everything
    return exact_or_regex(targets)


def _group(name: str, group: dict, fmt: str | None, weight_only: bool, mode: ActivationQuant) -> Group:
    where = f"quantization_config.config_groups.{name}"
    fmt = group.get("format") or fmt
    w = group.get("weights") or {}
    act = group.get("input_activations")
    if w.get("num_bits") != 4 or w.get("type") != "float":
        raise CheckpointError(f"{where}: weights are not 4-bit float ({w.get('num_bits')} bits, {w.get('type')!r})")
    if fmt == "nvfp4-pack-quantized":
        if w.get("group_size") != 16 or w.get("strategy") != "tensor_group":
            raise CheckpointError(f"{where}: NVFP4 needs group_size 16, strategy tensor_group; got {w}")
        if act is None or weight_only:
            return Group(NVFP4_LAYOUT, NVFP4W4A16(), _targets(group.get("targets", ["Linear"])))
        if act.get("num_bits") != 4 or act.get("group_size") != 16 or act.get("dynamic") not in ("local", True):
            raise CheckpointError(f"{where}: input activations {act} are not NVFP4 (dynamic local, group 16)")
        return Group(NVFP4_W4A4_LAYOUT, NVFP4W4A4(activation_mode=mode), _targets(group.get("targets", ["Linear"])))
    if fmt == "mxfp4-pack-quantized":
        if w.get("group_size") != 32:
            raise CheckpointError(f"{where}: MXFP4 needs group_size 32, got {w.get('group_size')}")
        if act is not None and not weight_only:
            raise CheckpointError(
                f"{where}: MXFP4 weights with dynamic MXFP4 activations (MXFP4 W4A4) are not supported; "
                "load with weight_only=True to run them as MXFP4 W4A16"
            )
        return Group(MXFP4_LAYOUT, MXFP4W4A16(), _targets(group.get("targets", ["Linear"])))
    raise CheckpointError(f"{where}: format {fmt!r} is not an FP4 format (nvfp4-pack-quantized, mxfp4-pack-quantized)")


def plan(config: dict, hf_quant: dict | None, *, weight_only: bool, activation_mode: ActivationQuant) -> Plan:
    qc = config["quantization_config"]
    if qc.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(
            f"quantization_status is {qc.get('quantization_status')!r}; only 'compressed' checkpoints hold FP4 bytes"
        )
    groups = qc.get("config_groups") or {}
    if not groups:
        raise CheckpointError("quantization_config.config_groups is empty")
    planned = [_group(n, g, qc.get("format"), weight_only, activation_mode) for n, g in groups.items()]
    desc = ", ".join(sorted({g.recipe.name for g in planned}))
    return Plan(
        NAME, planned, exact_or_regex(qc.get("ignore") or []), f"compressed-tensors {qc.get('version', '?')}: {desc}"
    )
