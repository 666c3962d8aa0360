"""NVIDIA ModelOpt HF export: ``quant_algo`` ``NVFP4`` (W4A4) and ``W4A16_NVFP4``.

Tensors per module (ModelOpt 0.47): ``weight`` U8 ``[N, K/2]``; ``weight_scale`` F8_E4M3
``[N, K/16]``; ``weight_scale_2`` F32 ``[]``, a **multiplier** (amax/(6*448)); W4A4 also
``input_scale`` F32 ``[]``, a multiplier. The scheme is in ``hf_quant_config.json`` and, in newer
exports, in ``config.json["quantization_config"]`` with ``quant_method: "modelopt"``. ModelOpt's
own decoder gives +0.0 for code 8 (``negative_zero=False``).
"""

from __future__ import annotations

import dataclasses

from jaxfp4.checkpoint.errors import CheckpointError
from jaxfp4.checkpoint.layouts import Group, Layout, Plan, everything, globs
from jaxfp4.formats import NVFP4W4A4, NVFP4W4A16, ActivationQuant, FP4Format, GlobalScale

NAME = "modelopt"

W4A16_LAYOUT = Layout(
    producer=NAME,
    format=FP4Format.NVFP4,
    codes="weight",
    scales="weight_scale",
    global_scale="weight_scale_2",
    global_kind=GlobalScale.MULTIPLIER,
    negative_zero=False,
)
W4A4_LAYOUT = dataclasses.replace(W4A16_LAYOUT, input_scale="input_scale", input_kind=GlobalScale.MULTIPLIER)


def _quant(config: dict, hf_quant: dict | None) -> dict:
    if hf_quant is not None and "quantization" in hf_quant:
        return hf_quant["quantization"]
    return config.get("quantization_config") or {}


def detect(config: dict, hf_quant: dict | None) -> bool:
    if hf_quant is not None and (hf_quant.get("producer") or {}).get("name") == "modelopt":
        return True
    return (config.get("quantization_config") or {}).get("quant_method") == "modelopt"


def plan(config: dict, hf_quant: dict | None, *, weight_only: bool, activation_mode: ActivationQuant) -> Plan:
    q = _quant(config, hf_quant)
    algo = q.get("quant_algo")
    if q.get("group_size", 16) != 16:
        raise CheckpointError(f"ModelOpt NVFP4 needs group_size 16, got {q.get('group_size')}")
    if algo == "NVFP4" and not weight_only:
        group = Group(W4A4_LAYOUT, NVFP4W4A4(activation_mode=activation_mode), everything)
    elif algo in ("NVFP4", "W4A16_NVFP4"):
        group = Group(W4A16_LAYOUT, NVFP4W4A16(), everything)
    else:
        raise CheckpointError(f"ModelOpt quant_algo {algo!r} is not supported (NVFP4, W4A16_NVFP4)")
    exclude = q.get("exclude_modules") or q.get("ignore") or []
    return Plan(NAME, [group], globs(exclude), f"ModelOpt {algo}: {group.recipe.name}")
