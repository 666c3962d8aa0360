"""Shared test configuration: float64 off (the library's arithmetic is float32), GPU detection."""

from __future__ import annotations

import os

# XLA may skip the rounding of bf16/fp16 intermediates inside fusions ("excess precision"),
# which PyTorch never does; comparisons with PyTorch are bit-level, so turn it off before any
# backend starts. (Users who need bit-exact agreement under jit set the same flag.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax
import pytest


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


requires_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU (none found)")
