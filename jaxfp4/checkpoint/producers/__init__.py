"""One module per producer; each turns a checkpoint's config into a :class:`~jaxfp4.checkpoint.layouts.Plan`.

``PRODUCERS`` is tried in order; the first whose ``detect`` accepts the config plans the load.
"""

from jaxfp4.checkpoint.producers import compressed_tensors, gpt_oss, modelopt, quark

PRODUCERS = (compressed_tensors, modelopt, quark, gpt_oss)

__all__ = ["PRODUCERS"]
