"""The float -> quantized module swap (``quantize_model``), and the list of quantized layers in model
order (``iter_qlayers``), both driven by the registry of :mod:`fimaq.models.registry`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.config import QuantSpec
from fimaq.errors import FimaqError
from fimaq.layers import QUANT_LAYER_TYPES, QuantLinear, QuantMatMul
from fimaq.models import registry
from fimaq.models.registry import Role, SwapContext

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class QLayer:
    """A quantized layer: its qualified name, module, role and (for folds) the LayerNorm feeding it.

    Attributes:
        name: qualified name in the model.
        module: the ``QuantLinear`` / ``QuantConv2d`` / ``QuantMatMul``.
        role: what the layer does in its family (``qkv``, ``fc2``, ``head``, ...).
        unit: the reconstruction unit holding it (a block, a patch merging, the patch embedding or a
            head); a layer outside every unit is its own.
        norm: the LayerNorm feeding it directly (the calibration folds per-channel scales into it).
        co_readers: the other linears reading that LayerNorm's output (SwiGLU's second input
            projection, separate k and v projections): the fold compensates their weights too.
    """

    name: str
    module: nn.Module
    role: Role
    unit: str
    norm: nn.LayerNorm | None = None
    co_readers: tuple[nn.Module, ...] = ()


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero image of the size the model was built for (``model.patch_embed.img_size``)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "img_size"):
        raise FimaqError(f"{type(model).__name__} has no patch_embed.img_size: not a ViT-like model")
    h, w = pe.img_size
    in_chans = pe.proj.in_channels
    p = next(model.parameters())
    return torch.zeros(batch, in_chans, h, w, device=p.device, dtype=p.dtype)


Examples = tuple[dict[str, tuple[int, ...]], dict[str, dict[str, torch.Tensor]]]


def _record_examples(model: nn.Module) -> Examples:
    """On a zero image: the input shape (without batch and channel dims) of every registered module,
    and the tensors each was given by keyword (EVA's ``rope``, a shared relative position bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    kwargs: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if registry.entry_of(mod) is not None:

            def hook(_m: nn.Module, args: tuple, kw: dict, _out: object, name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    shapes[name] = tuple(args[0].shape[1:-1])
                kwargs[name] = {k: v.detach() for k, v in kw.items() if isinstance(v, torch.Tensor)}

            hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(example_input(model))
    finally:
        for h in hooks:
            h.remove()
    return shapes, kwargs


def _log_attention_probs(model: nn.Module, kind: str) -> None:
    """Put the attention probabilities (``A`` of every attention's ``matmul2 = attn @ v``) on a log grid."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantMatMul) and name.rsplit(".", 1)[-1] == "matmul2" and mod.A_quantizer.bits:
            mod.use_log_grid(kind)


def quantize_model(model: nn.Module, spec: QuantSpec, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the registered quantizable modules of a model for their quantized forms, in place.

    Modules are visited top-down in ``named_modules`` order; a module whose type has a constructor in
    the registry (and a role from its family, for types such as ``nn.Conv2d`` that need one) is
    swapped when ``filter_fn`` accepts it. The children of a swapped module are built by its
    constructor and not offered to ``filter_fn`` (keep one of them FP with an override of 32 bits).
    Quantizers start disabled (the model computes exactly as before); calibration fills and enables
    them.

    Args:
        model: a float model of a registered family (the timm families are built in).
        spec: bit-widths and per-layer overrides; a pattern among the overrides that matches none of
            the quantized layers is an error.
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` decides which registered modules are
            swapped; all by default.

    Returns:
        The same model object.

    Raises:
        FimaqError: a bit-width is out of range, the model has no registered transformer block, or
            an override pattern matches none of the quantized layers.

    Example::

        spec = QuantSpec(w_bits=4, a_bits=4, overrides={"blocks.*.mlp.fc2": {"w_bits": 8}})
        quantize_model(model, spec, filter_fn=lambda module, name: name != "head")  # FP classifier
    """
    spec.validate()
    registry.require_family(model)
    if spec.rotation == "hadamard":
        from fimaq.models.rotation import rotate_model

        rotate_model(model)
    shapes, example_kwargs = _record_examples(model)
    declared = registry.declared_roles(model)
    swapped: list[str] = []  # and those kept float with their children
    for name, mod in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in swapped):
            continue  # built by the constructor of an enclosing module, or kept float
        found = registry.lookup(mod)
        if found is not None and found[0].keep_float:
            swapped.append(name)
            continue
        if found is None or found[1] or found[0].quantize is None:
            continue
        entry = found[0]
        if entry.needs_role and name not in declared:
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        role = registry.role_of(name, mod, declared)
        ctx = SwapContext(name, role, spec, shapes.get(name), entry.roles, example_kwargs.get(name, {}))
        model.set_submodule(name, entry.quantize(mod, ctx))
        swapped.append(name)
    spec.check_overrides(q.name for q in iter_qlayers(model))
    if spec.attn_probs != "uniform":
        _log_attention_probs(model, spec.attn_probs)
    if filter_fn is None:
        _warn_float_attention(model)
    return model


def _warn_float_attention(model: nn.Module) -> None:
    """Warn when blocks hold no quantized attention product: an attention type the registry does not
    know (timm's ``AttentionRope``) had only its linears swapped, and computes its products in float."""
    blocks = [u for u in registry.find_units(model) if u.kind == "block"]
    bare = [u for u in blocks if not any(isinstance(m, QuantMatMul) for m in u.module.modules())]
    if bare:
        types = sorted(
            {
                type(m).__name__
                for u in bare
                for m in u.module.modules()
                if registry.entry_of(m) is None and any(isinstance(c, QuantLinear) for c in m.children())
            }
        )
        log.warning(
            "%d of %d blocks (%s, ...) hold no quantized attention product: their attention (%s) is not "
            "a registered type, so q @ k^T and attn @ v stay float; register it to quantize them",
            len(bare),
            len(blocks),
            bare[0].name,
            ", ".join(types) or "unknown",
        )


def iter_qlayers(model: nn.Module) -> Iterator[QLayer]:
    """Quantized layers in model (``named_modules``) order, with their roles, units and fold partners."""
    declared = registry.declared_roles(model)
    partners = registry.fold_partners(model)
    units = [u.name for u in registry.find_units(model)]
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if not isinstance(mod, QUANT_LAYER_TYPES):
            continue
        role = registry.role_of(name, mod, declared)
        if role is None:
            raise FimaqError(f"quantized layer {name} has no role: register the module that holds it")
        unit = next((u for u in units if name == u or name.startswith(u + ".")), name)
        norm, co_readers = None, ()
        if name in partners:
            norm = modules.get(partners[name][0])
            co_readers = tuple(modules[r] for r in partners[name][1])
            if not isinstance(norm, nn.LayerNorm) or not all(isinstance(r, QuantLinear) for r in co_readers):
                norm, co_readers = None, ()  # a reader kept float (no bias to move an offset into)
        yield QLayer(name, mod, role, unit, norm, co_readers)
