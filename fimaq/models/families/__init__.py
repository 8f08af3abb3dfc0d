"""The timm families beyond ViT/DeiT and Swin, one module each: its quantized attention (in
:mod:`fimaq.layers`) and its :class:`~fimaq.models.registry.Quantizable` entries (``entries()``).
Each module imports timm inside ``entries()``, so importing fimaq does not import timm."""

from __future__ import annotations

from fimaq.models.families import beit, cait, eva, relpos, swinv2
from fimaq.models.registry import Quantizable

FAMILIES = (eva, beit, relpos, swinv2, cait)


def entries() -> tuple[Quantizable, ...]:
    """The entries of every family module above, in that order."""
    return tuple(e for family in FAMILIES for e in family.entries())
