"""Flax layers over ``jaxfp4.fp4_linear``: NNX first (:class:`Fp4Linear`), linen wrapper."""

from jaxfp4.nn.linear import Fp4Linear, Fp4LinearLinen, QuantizedParam

__all__ = ["Fp4Linear", "Fp4LinearLinen", "QuantizedParam"]
