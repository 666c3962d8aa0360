"""Shared test configuration: float64 off (the library's arithmetic is float32), GPU detection."""

from __future__ import annotations

import jax
import pytest


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


requires_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU (none found)")
