"""The one way any stage changes what the quantizers of a model do.

A quantizer is off (the model computes in float), on (fake quantization), or training (straight-
through gradients, and QDrop: each element keeps its quantized value with probability ``qdrop``,
its float value otherwise, by masks from a :data:`MaskFn`). Attention can also be routed through
its explicit matmul modules so calibration can capture their operands: every module with a boolean
``explicit_matmuls`` attribute (``QuantAttention``, ``QuantWindowAttention``, and the quantized
attention of a registered family that has one) follows that switch.

:func:`quant_mode` sets all of it for a model (or for the given parts of it) and restores the
previous state on exit; :func:`set_quant_mode` sets it for good (after loading a quantized
artifact, for example). Nothing else writes these flags.

Example::

    with quant_mode(net, only=[block]):  # block quantized, the rest of the model in float
        y = net(x)
    with quant_mode(net, enabled=False, explicit_matmuls=True):  # float, matmul operands visible
        capture(...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.rounding import LearnedRounding
from fimaq.quant.ste import bernoulli_mask

MaskFn = Callable[..., torch.Tensor]
"""``masks(shape, p, device, dtype, order=None)``: a float 0/1 QDrop mask, 1 (keep quantized) with
probability p, laid out in memory in ``order`` (:func:`fimaq.quant.fake_quant.dense_order`); with
``dtype`` None the random bytes it comes from (:func:`fimaq.quant.ste.mask_from_bytes`)."""


def generator_masks(generator: torch.Generator | None) -> MaskFn:
    """QDrop masks drawn from ``generator`` (:func:`fimaq.quant.ste.bernoulli_mask`)."""

    def masks(
        shape: torch.Size,
        p: float,
        device: torch.device,
        dtype: torch.dtype | None,
        order: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        return bernoulli_mask(shape, p, generator, device, dtype, order)

    return masks


@dataclass(frozen=True)
class QuantizerState:
    """What one quantizer does: ``enabled``; with ``ste`` straight-through gradients; with ``qdrop``
    (and ``masks``) QDrop."""

    enabled: bool = False
    ste: bool = False
    qdrop: float | None = None
    masks: MaskFn | None = None

    @classmethod
    def of(cls, q: UniformQuantizer) -> QuantizerState:
        return cls(q.enabled, q.ste, q.qdrop, q.masks)

    def apply(self, q: UniformQuantizer) -> None:
        q.enabled, q.ste, q.qdrop, q.masks = self.enabled, self.ste, self.qdrop, self.masks
        q.bounds = None  # recomputed from the zero point on the next training pass


@dataclass
class Snapshot:
    """The state of every quantizer and attention of a model before :func:`set_quant_mode`."""

    quantizers: dict[UniformQuantizer, QuantizerState]
    explicit: dict[nn.Module, bool]

    def restore(self) -> None:
        for q, state in self.quantizers.items():
            state.apply(q)
        for attn, flag in self.explicit.items():
            attn.explicit_matmuls = flag


def _inside(only: Iterable[nn.Module]) -> set[UniformQuantizer]:
    return {q for part in only for q in part.modules() if isinstance(q, UniformQuantizer)}


def set_quant_mode(
    model: nn.Module,
    *,
    enabled: bool = True,
    only: Iterable[nn.Module] | None = None,
    train: bool = False,
    qdrop: float | None = None,
    masks: MaskFn | None = None,
    explicit_matmuls: bool = False,
) -> Snapshot:
    """Set what every quantizer of ``model`` does; returns the previous state (``.restore()``).

    Args:
        model: the quantized model (or any module holding quantizers).
        enabled: quantize (True) or compute in float (False).
        only: quantize only the quantizers inside these submodules; every other one computes in
            float. ``None``: all of them.
        train: straight-through gradients (to the inputs and the scales) in the enabled quantizers
            other than the base quantizers of learned rounding (AdaRound, STE rounding: they round
            those weights themselves).
        qdrop: with ``train``, the probability that an element keeps its quantized value (QDrop);
            ``None`` or 1 keeps every element quantized.
        masks: the QDrop masks; needed with ``qdrop`` (:func:`generator_masks` for plain seeded ones).
        explicit_matmuls: route attention through its matmul modules even when they compute in float.
    """
    if qdrop is not None and (not train or masks is None):
        raise ValueError("qdrop needs train=True and a masks function")
    snapshot = Snapshot({}, {})
    chosen = _inside(only) if only is not None else None
    bases = {m.base for m in model.modules() if isinstance(m, LearnedRounding)}
    for q in model.modules():
        if isinstance(q, UniformQuantizer):
            snapshot.quantizers[q] = QuantizerState.of(q)
            on = enabled and (chosen is None or q in chosen)
            training = on and train and q not in bases
            QuantizerState(
                on, training, qdrop if training else None, masks if training and qdrop is not None else None
            ).apply(q)
        elif isinstance(getattr(q, "explicit_matmuls", None), bool):
            snapshot.explicit[q] = q.explicit_matmuls
            q.explicit_matmuls = explicit_matmuls
    return snapshot


@contextmanager
def quant_mode(model: nn.Module, **mode) -> Iterator[Snapshot]:
    """:func:`set_quant_mode` for the duration of the block; the previous state comes back on exit."""
    snapshot = set_quant_mode(model, **mode)
    try:
        yield snapshot
    finally:
        snapshot.restore()
