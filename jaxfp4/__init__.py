"""jaxfp4: FP4-quantized (NVFP4, MXFP4) checkpoints from PyTorch producers, in JAX and Flax.

The public API, curated here and pinned by ``tests/test_public_api.py``.
"""

from jaxfp4.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from jaxfp4.formats import (
    MXFP4W4A8,
    MXFP4W4A16,
    NVFP4W4A4,
    NVFP4W4A16,
    ActivationQuant,
    FP4Format,
    GlobalScale,
    QuantizedTensor,
    Recipe,
    dequantize,
)
from jaxfp4.ops import Fp4LinearParams, fp4_linear, make_params, prepare_weights

__version__ = "0.1.0"

__all__ = [
    "MXFP4W4A8",
    "MXFP4W4A16",
    "NVFP4W4A4",
    "NVFP4W4A16",
    "ActivationQuant",
    "Checkpoint",
    "CheckpointError",
    "FP4Format",
    "Fp4LinearParams",
    "GlobalScale",
    "QuantizedTensor",
    "Recipe",
    "__version__",
    "dequantize",
    "fp4_linear",
    "load_checkpoint",
    "make_params",
    "prepare_weights",
]
