"""AMD Quark (0.13) ``export_safetensors``: ``nvfp4`` (W4A4), ``mxfp4_fp8`` (W4A8), ``mxfp4`` (W4A4).

Tensors per module: ``weight`` U8 ``[N, K/2]``; ``weight_scale`` F8_E4M3 ``[N, K/16]`` (NVFP4) or
U8 E8M0 ``[N, K/32]`` (MXFP4); NVFP4: ``weight_scale_2`` F32 ``[]`` and ``input_scale_2`` F32
``[]``, both **multipliers**; W4A8: ``input_scale`` ``[]`` in the model dtype, a multiplier
(``x ~ fp8 * input_scale``). The scheme is ``quantization_config.global_quant_config``; ``exclude``
entries are exact names or ``re:`` regexes (vLLM's ``should_ignore_layer``).
"""

from __future__ import annotations

import dataclasses

from jaxfp4.checkpoint.errors import CheckpointError
from jaxfp4.checkpoint.layouts import Group, Layout, Plan, everything, exact_or_regex
from jaxfp4.formats import MXFP4W4A8, MXFP4W4A16, NVFP4W4A4, NVFP4W4A16, ActivationQuant, FP4Format, GlobalScale

NAME = "quark"

NVFP4_W4A16_LAYOUT = Layout(
    producer=NAME,
    format=FP4Format.NVFP4,
    codes="weight",
    scales="weight_scale",
    global_scale="weight_scale_2",
    global_kind=GlobalScale.MULTIPLIER,
)
NVFP4_LAYOUT = dataclasses.replace(NVFP4_W4A16_LAYOUT, input_scale="input_scale_2", input_kind=GlobalScale.MULTIPLIER)
MXFP4_LAYOUT = Layout(producer=NAME, format=FP4Format.MXFP4, codes="weight", scales="weight_scale")
MXFP4_FP8_LAYOUT = dataclasses.replace(
    MXFP4_LAYOUT, input_scale="input_scale", input_kind=GlobalScale.MULTIPLIER, input_dtypes=("BF16", "F16", "F32")
)


def detect(config: dict, hf_quant: dict | None) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "quark"


def _is(spec: object, dtype: str, qscheme: str, **kw: object) -> bool:
    return (
        isinstance(spec, dict)
        and spec.get("dtype") == dtype
        and spec.get("qscheme") == qscheme
        and all(spec.get(k) == v for k, v in kw.items())
    )


def plan(config: dict, hf_quant: dict | None, *, weight_only: bool, activation_mode: ActivationQuant) -> Plan:
    qc = config["quantization_config"]
    if "export" not in qc:
        raise CheckpointError("Quark quantization_config has no 'export' section (not a Quark export)")
    if qc.get("layer_quant_config") or qc.get("layer_type_quant_config"):
        raise CheckpointError("Quark per-layer configs (layer_quant_config) are not supported")
    gq = qc.get("global_quant_config") or {}
    w, x = gq.get("weight"), gq.get("input_tensors")
    if gq.get("output_tensors") or gq.get("bias"):
        raise CheckpointError("Quark output or bias quantization is not supported")
    if (
        isinstance(w, list)
        and len(w) == 2
        and _is(w[0], "fp4", "per_group", group_size=16, is_dynamic=False)
        and _is(w[1], "fp8_e4m3", "per_tensor", is_dynamic=False)
    ):
        if weight_only or x is None:
            group = Group(NVFP4_W4A16_LAYOUT, NVFP4W4A16(), everything)
        elif (
            isinstance(x, list)
            and len(x) == 2
            and _is(x[0], "fp4", "per_group", group_size=16, is_dynamic=True)
            and _is(x[1], "fp8_e4m3", "per_tensor", is_dynamic=False)
        ):
            group = Group(NVFP4_LAYOUT, NVFP4W4A4(activation_mode=activation_mode), everything)
        else:
            raise CheckpointError(f"Quark NVFP4 weights with input_tensors {x} are not supported")
    elif _is(w, "fp4", "per_group", group_size=32, scale_format="e8m0", is_dynamic=False):
        if weight_only or x is None:
            group = Group(MXFP4_LAYOUT, MXFP4W4A16(), everything)
        elif _is(x, "fp8_e4m3", "per_tensor", is_dynamic=False, symmetric=True):
            group = Group(MXFP4_FP8_LAYOUT, MXFP4W4A8(), everything)
        else:
            raise CheckpointError(
                f"Quark MXFP4 weights with input_tensors {x} (e.g. dynamic MXFP4, W4A4) are not supported; "
                "load with weight_only=True to run them as MXFP4 W4A16"
            )
    else:
        raise CheckpointError(
            f"Quark weight spec {w} is not NVFP4 (fp4 per_group 16 + fp8 per_tensor) or MXFP4 (fp4 per_group 32 e8m0)"
        )
    return Plan(
        NAME, [group], exact_or_regex(qc.get("exclude") or []), f"Quark {qc.get('version', '?')}: {group.recipe.name}"
    )
