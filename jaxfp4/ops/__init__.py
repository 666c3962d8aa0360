"""How to compute: ``fp4_linear`` (the one dispatch point), layer params, and the backends."""

from jaxfp4.ops.dispatch import BACKENDS, Backend, fp4_linear, fp4_linear_deferred, select_backend
from jaxfp4.ops.pallas import SplitKSum, pallas_interpret, prepare_weights
from jaxfp4.ops.params import Fp4LinearParams, KernelLayout, concat_biases, concat_params, fusion_blocker, make_params

__all__ = [
    "BACKENDS",
    "Backend",
    "Fp4LinearParams",
    "KernelLayout",
    "SplitKSum",
    "concat_biases",
    "concat_params",
    "fp4_linear",
    "fp4_linear_deferred",
    "fusion_blocker",
    "make_params",
    "pallas_interpret",
    "prepare_weights",
    "select_backend",
]
