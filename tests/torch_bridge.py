"""Exact torch <-> numpy/JAX conversion helpers for the reference tests (bit patterns kept)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

_VIEWS = {
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float16: (torch.int16, np.float16),
}


def to_np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype in _VIEWS:
        iv, npdt = _VIEWS[t.dtype]
        return t.view(iv).numpy().view(npdt)
    return t.numpy()


def to_torch(a) -> torch.Tensor:
    a = np.asarray(a)
    for tdt, (iv, npdt) in _VIEWS.items():
        if a.dtype == np.dtype(npdt):
            return torch.from_numpy(a.view(np.int16 if iv is torch.int16 else np.uint8).copy()).view(tdt)
    return torch.from_numpy(a.copy())


def bits(a) -> np.ndarray:
    """Raw bit pattern of an array (for sign-of-zero-exact comparisons)."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def jx(a) -> jnp.ndarray:
    return jnp.asarray(a)
