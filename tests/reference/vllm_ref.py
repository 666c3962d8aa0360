"""PyTorch transcriptions of vLLM's FP4 emulation functions: the executable PyTorch reference.

Transcribed (not imported: vLLM does not install on a CPU-only test machine) from vLLM 0.33.0,
``vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py`` (CPU branches), and
the MXFP4 / FP8 paths named on each function. Each function keeps the upstream arithmetic order,
since bit-exactness depends on it.
"""

from __future__ import annotations

import torch

FLOAT4_E2M1_MAX_RECIPROCAL = 1 / 6.0
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


def break_fp4_bytes(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``nvfp4_emulation_utils.break_fp4_bytes``: uint8 [m, n] -> values [m, 2n], low nibble first."""
    m, n = a.shape
    flat = a.flatten()
    combined = torch.stack(((flat & 0x0F), (flat & 0xF0) >> 4), dim=1).flatten()
    signs = (combined & 0x08).to(torch.bool)
    vals = _E2M1[(combined & 0x07).to(torch.long)] * torch.where(signs, -1.0, 1.0)
    return vals.reshape(m, n * 2).to(dtype)


def dequantize_to_dtype(
    tensor_fp4: torch.Tensor,
    tensor_sf: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype,
    block_size: int = 16,
) -> torch.Tensor:
    """``dequantize_to_dtype`` with ``swizzle=False`` off CUDA: ``dtype(q * f32(sf * global_scale))``;
    ``global_scale`` is the fp32 multiplier ``1 / max(weight_global_scale)`` (vLLM 0.33)."""
    m, packed_k = tensor_fp4.shape
    k = packed_k * 2
    t = break_fp4_bytes(tensor_fp4, torch.float32).reshape(-1, k // block_size, block_size)
    sf = tensor_sf.view(torch.float8_e4m3fn).to(torch.float32) * global_scale
    return (t * sf.unsqueeze(-1)).reshape(m, k).to(dtype)


def get_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``get_reciprocal`` (tensor branch)."""
    return 1.0 / (x + (x == 0) * 1e8)


def cast_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """``cast_to_fp4``: round to the E2M1 grid with vLLM's explicit thresholds."""
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def ref_nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor, block_size: int = 16):
    """``ref_nvfp4_quant``: returns (fp4 values f32 [m, n], block scales f32 [m, n/16])."""
    m, n = x.shape
    x = torch.reshape(x, (m, n // block_size, block_size))
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * FLOAT4_E2M1_MAX_RECIPROCAL)
    scale = torch.clamp(scale, max=448, min=-448)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = get_reciprocal(scale * get_reciprocal(global_scale))
    scaled_x = x.to(torch.float32) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return cast_to_fp4(clipped_x), scale.squeeze(-1)


def ref_nvfp4_quant_dequant(x: torch.Tensor, global_scale: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """``ref_nvfp4_quant_dequant`` (CPU branch): ``dtype(q * (scale / global_scale))``."""
    m, k = x.shape
    x_fp4, x_bs = ref_nvfp4_quant(x, global_scale, block_size)
    x_fp4 = x_fp4.reshape(m, k // block_size, block_size)
    return (x_fp4 * (x_bs.unsqueeze(-1) / global_scale)).reshape(m, k).to(x.dtype)


def run_nvfp4_emulations(
    x: torch.Tensor,
    input_global_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale_mult: torch.Tensor,
) -> torch.Tensor:
    """``run_nvfp4_emulations`` (W4A4): activation QDQ, weight dequant, ``torch.matmul``."""
    x_dq = ref_nvfp4_quant_dequant(x, input_global_scale, 16)
    w_dq = dequantize_to_dtype(weight, weight_scale, weight_global_scale_mult, x.dtype, 16)
    return torch.matmul(x_dq, w_dq.t())


def dequant_mxfp4(w: torch.Tensor, scale_e8m0: torch.Tensor, float_dtype: torch.dtype) -> torch.Tensor:
    """vLLM ``mxfp4_utils._dequant_mxfp4`` -> amd-quark ``mx.dq_mxfp4``: ``dtype(q * 2**(e-127))``,
    per 32 elements along the last axis (see research/quark.md §4.3)."""
    m, packed_k = w.shape
    k = packed_k * 2
    t = break_fp4_bytes(w, torch.float32).reshape(m, k // 32, 32)
    s = torch.exp2(scale_e8m0.to(torch.float32) - 127.0)
    return (t * s.unsqueeze(-1)).reshape(m, k).to(float_dtype)


def quant_fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor FP8 input QDQ of vLLM ``quark_w4a8_mxfp4_fp8.py`` / Quark
    ``fake_quantize_fp8_per_tensor_with_scale``: returns (fp8 codes, x_dq in x.dtype)."""
    x_fp8 = (x / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return x_fp8, (x_fp8.to(x.dtype) * input_scale).to(x.dtype)
