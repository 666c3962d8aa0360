"""Pallas GPU kernels; imported only by the "pallas" backend of ``fp4_linear``."""
