"""What the bits mean: codecs, nibble packing, the QuantizedTensor pytree, recipes, encoders.

Pure ``jax.numpy``; imports nothing else of jaxfp4.
"""

from jaxfp4.formats.activations import (
    fake_quantize_fp8_static,
    fake_quantize_nvfp4_activations,
    quantize_fp8_static,
    quantize_nvfp4_activations,
)
from jaxfp4.formats.codecs import (
    decode_e2m1,
    decode_e4m3,
    decode_e8m0,
    encode_e2m1,
    encode_e4m3,
    pack_nibbles,
    unpack_nibbles,
)
from jaxfp4.formats.encoders import (
    mxfp4_scale_exponent_llmcompressor,
    quantize_mxfp4_llmcompressor,
    quantize_nvfp4_llmcompressor,
    quantize_nvfp4_modelopt,
)
from jaxfp4.formats.tensor import (
    MXFP4W4A8,
    MXFP4W4A16,
    NVFP4W4A4,
    NVFP4W4A16,
    RECIPES,
    ActivationQuant,
    FP4Format,
    GlobalScale,
    QuantizedTensor,
    Recipe,
    concat_partitions,
    dequantize,
    mxfp4_as_e4m3,
    mxfp4_e4m3_bytes,
    mxfp4_e4m3_window,
    slice_rows,
)

__all__ = [
    "MXFP4W4A8",
    "MXFP4W4A16",
    "NVFP4W4A4",
    "NVFP4W4A16",
    "RECIPES",
    "ActivationQuant",
    "FP4Format",
    "GlobalScale",
    "QuantizedTensor",
    "Recipe",
    "concat_partitions",
    "decode_e2m1",
    "decode_e4m3",
    "decode_e8m0",
    "dequantize",
    "encode_e2m1",
    "encode_e4m3",
    "fake_quantize_fp8_static",
    "fake_quantize_nvfp4_activations",
    "mxfp4_as_e4m3",
    "mxfp4_e4m3_bytes",
    "mxfp4_e4m3_window",
    "mxfp4_scale_exponent_llmcompressor",
    "pack_nibbles",
    "quantize_fp8_static",
    "quantize_mxfp4_llmcompressor",
    "quantize_nvfp4_activations",
    "quantize_nvfp4_llmcompressor",
    "quantize_nvfp4_modelopt",
    "slice_rows",
    "unpack_nibbles",
]
