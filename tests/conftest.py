"""Shared test configuration: float64 off (the library's arithmetic is float32), GPU detection."""

from __future__ import annotations

import os

# XLA may skip the rounding of bf16/fp16 intermediates inside fusions ("excess precision"),
# which PyTorch never does; comparisons with PyTorch are bit-level, so turn it off before any
# backend starts. (Users who need bit-exact agreement under jit set the same flag.)
# Eight simulated CPU devices for the tensor-parallel tests (tests/test_sharding.py); other tests
# run on the default device as before. (No effect on a GPU backend.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


_skip_without_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU (none found)")


def requires_gpu(test):
    """Mark a test (or class) as a GPU test: skipped cleanly without a GPU, and selected by
    ``pytest -m gpu`` on a GPU machine (which leaves out the slow interpret-mode tests)."""
    return pytest.mark.gpu(_skip_without_gpu(test))
