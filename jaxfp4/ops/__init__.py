"""How to compute: ``fp4_linear`` (the one dispatch point), layer params, and the backends."""

from jaxfp4.ops.dispatch import BACKENDS, Backend, fp4_linear, select_backend
from jaxfp4.ops.pallas import pallas_interpret, prepare_weights
from jaxfp4.ops.params import Fp4LinearParams, KernelLayout, concat_biases, concat_params, fusion_blocker, make_params

__all__ = [
    "BACKENDS",
    "Backend",
    "Fp4LinearParams",
    "KernelLayout",
    "concat_biases",
    "concat_params",
    "fp4_linear",
    "fusion_blocker",
    "make_params",
    "pallas_interpret",
    "prepare_weights",
    "select_backend",
]
