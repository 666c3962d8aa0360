"""gpt-oss MXFP4 (OpenAI's checkpoints): MoE expert weights only, ``quant_method: "mxfp4"``.

Per MoE layer ``P = model.layers.L.mlp.experts``: ``P.gate_up_proj_blocks`` U8 ``[E, 2I, H/32, 16]``
(16 bytes = 32 E2M1 codes per block, low nibble first), ``P.gate_up_proj_scales`` U8 E8M0
``[E, 2I, H/32]``, ``P.gate_up_proj_bias`` ``[E, 2I]``; likewise ``down_proj`` with ``[E, H, I/32, 16]``.
Rows of ``gate_up_proj`` interleave gate (even rows) and up (odd rows), as the model expects.
Each expert is returned as its own module ``P.<e>.gate_up_proj`` / ``P.<e>.down_proj`` in
PyTorch's ``(N, K)`` orientation (transformers transposes to ``[E, K, N]`` after dequantizing).
"""

from __future__ import annotations

from jaxfp4.checkpoint.layouts import Group, Layout, Plan, everything, globs
from jaxfp4.formats import MXFP4W4A16, ActivationQuant, FP4Format

NAME = "gpt-oss"

LAYOUT = Layout(producer=NAME, format=FP4Format.MXFP4, codes="blocks", scales="scales", bias="bias", sep="_", experts=True)


def detect(config: dict, hf_quant: dict | None) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def plan(config: dict, hf_quant: dict | None, *, weight_only: bool, activation_mode: ActivationQuant) -> Plan:
    skip = config["quantization_config"].get("modules_to_not_convert") or []
    return Plan(NAME, [Group(LAYOUT, MXFP4W4A16(), everything)], globs(skip), "gpt-oss MXFP4 experts: mxfp4_w4a16")
