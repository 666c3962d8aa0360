"""Checkpoint loading: safetensors written by PyTorch FP4 producers -> jaxfp4 pytrees.

``load_checkpoint(path)`` detects the producer (compressed-tensors / llm-compressor, NVIDIA
ModelOpt, AMD Quark, gpt-oss) from the config, reads its layout (declared as data, one module per
producer in ``producers/``) and returns a :class:`Checkpoint`.
"""

from jaxfp4.checkpoint.errors import CheckpointError, LoadReport
from jaxfp4.checkpoint.loader import Checkpoint, load_checkpoint
from jaxfp4.checkpoint.safetensors_io import SafetensorsFile

__all__ = ["Checkpoint", "CheckpointError", "LoadReport", "SafetensorsFile", "load_checkpoint"]
