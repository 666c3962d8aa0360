"""Producer layouts as data: which tensors make up one quantized module, and what they mean.

Each producer module (``jaxfp4/checkpoint/producers/``) reads a checkpoint's config and returns a
:class:`Plan`: per module, a :class:`Layout` and a recipe. One converter (``loader.py``) reads every
producer's tensors through these declarations; the divisor-vs-multiplier difference is normalized
there, once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Sequence

from jaxfp4.formats import FP4Format, GlobalScale, Recipe


@dataclasses.dataclass(frozen=True)
class Layout:
    """The tensors of one quantized linear module ``M`` as a producer stores them.

    A tensor's key is ``M + sep + suffix``. ``codes``: packed E2M1, ``U8`` ``[N, K/2]`` (element
    ``2j`` in the low nibble); ``scales``: block scales ``[N, K/16]`` (``F8_E4M3``) or ``[N, K/32]``
    (E8M0, stored as ``U8`` or ``F8_E8M0``); ``global_scale``: the NVFP4 weight global scale, a
    single float32 stored with shape ``[1]`` or ``[]``; ``input_scale``: the static activation
    scale (``None`` if the scheme has none), in the convention ``input_kind``.

    ``experts``: the gpt-oss layout, where codes are ``[E, N, K/32, 16]``, scales ``[E, N, K/32]``
    and bias ``[E, N]``; each expert becomes its own module ``<parent>.<e>.<name>``.
    """

    producer: str
    format: FP4Format
    codes: str
    scales: str
    global_scale: str | None = None
    global_kind: GlobalScale = GlobalScale.NONE
    input_scale: str | None = None
    input_kind: GlobalScale = GlobalScale.NONE
    input_dtypes: tuple[str, ...] = ("F32",)
    bias: str = "bias"
    sep: str = "."
    negative_zero: bool = True
    experts: bool = False

    def key(self, module: str, suffix: str) -> str:
        return module + self.sep + suffix

    @property
    def scale_dtypes(self) -> tuple[str, ...]:
        return ("F8_E4M3",) if self.format is FP4Format.NVFP4 else ("U8", "F8_E8M0")

    def roles(self) -> dict[str, str]:
        """Role name -> suffix, for the roles this layout has."""
        out = {"codes": self.codes, "scales": self.scales, "bias": self.bias}
        if self.global_scale:
            out["global_scale"] = self.global_scale
        if self.input_scale:
            out["input_scale"] = self.input_scale
        return out


@dataclasses.dataclass(frozen=True)
class Group:
    """Modules matching ``targets`` (and not ``ignored``) are stored with ``layout``, computed with ``recipe``."""

    layout: Layout
    recipe: Recipe
    targets: Callable[[str], bool]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a producer's config says about the checkpoint.

    ``groups`` are tried in order; ``ignored(module)`` is true for modules the config keeps dense.
    """

    producer: str
    groups: Sequence[Group]
    ignored: Callable[[str], bool]
    description: str

    def group_for(self, module: str) -> Group | None:
        for g in self.groups:
            if g.targets(module):
                return g
        return None


#: Every suffix any producer gives a quantization tensor; used to spot mixed conventions.
QUANT_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_global_scale",
    "input_global_scale",
    "weight_scale_2",
    "input_scale",
    "input_scale_2",
    "weight_zero_point",
)


def exact_or_regex(patterns: Sequence[str]) -> Callable[[str], bool]:
    """compressed-tensors / Quark matching: ``re:<regex>`` (``re.match``, as vLLM does) or the exact module name."""
    regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]
    names = {p for p in patterns if not p.startswith("re:")}

    def match(module: str) -> bool:
        return module in names or any(r.match(module) for r in regexes)

    return match


def globs(patterns: Sequence[str]) -> Callable[[str], bool]:
    """ModelOpt / gpt-oss matching: ``fnmatch`` globs against the module name (``*`` spans dots)."""

    def match(module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) or module.startswith(p + ".") for p in patterns)

    return match


def everything(_: str) -> bool:
    return True
