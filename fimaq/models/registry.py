"""The open registry of quantizable modules: what fimaq knows about each model family.

One :class:`Quantizable` describes one float module type: the constructor of its quantized form,
whether it is a reconstruction unit (and of which kind), the roles of the layers inside it, which of
its LayerNorms feeds which layer, and its classifier heads. :func:`register` adds a whole family in
one call; the built-in families (:mod:`fimaq.models.timm_families`: timm ViT/DeiT and Swin, the
others in :mod:`fimaq.models.families`, plain ``nn.Linear``, the patch-embedding ``nn.Conv2d``) are
the same kind of entries, added the first time the registry is consulted (so importing fimaq does
not import timm). The registry is the one piece of process-wide state of the swap: scope test or
experimental registrations with ``with register(...):``.

A module's entry is found through its class's MRO (a subclass of a registered type shares its entry
unless registered itself); a module whose class is the quantized form of an entry (``QuantLinear``,
``QuantAttention``, ...) has that entry too, so the structure can be read before and after the swap.
Paths inside an entry (``"attn.qkv"``) are relative to the module the entry describes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fimaq.config import QuantSpec
from fimaq.errors import FimaqError

UnitKind = Literal["patch_embed", "block", "merge", "head"]
Role = Literal[
    "patch_embed", "qkv", "proj", "fc1", "fc2", "reduction", "head", "linear", "matmul1", "matmul2"
]

_BITS_ROLE: dict[str, str] = {
    "patch_embed": "patch_embed",
    "head": "head",
    "matmul1": "matmul",
    "matmul2": "matmul",
}


@dataclass(frozen=True)
class SwapContext:
    """What a quantized-form constructor is told about the module it replaces.

    Attributes:
        name: the module's qualified name in the model.
        role: the module's role (given by an enclosing entry, else its own entry's ``role``).
        spec: the bit-widths of the model.
        token_shape: the module's input shape between the batch and the channel dims, recorded on an
            example forward pass (``(197,)`` for ViT tokens); ``None`` when it was not called.
        roles: the roles of the module's children (its entry's ``roles``).
        example_kwargs: the tensors the module was given by keyword on the example forward pass (EVA's
            ``rope``, a shared relative position bias): inputs that do not depend on the image, which a
            quantized form keeps so that it computes the same when a reconstruction unit is called
            with its input alone.
    """

    name: str
    role: Role | None
    spec: QuantSpec
    token_shape: tuple[int, ...] | None = None
    roles: Mapping[str, Role] = field(default_factory=dict)
    example_kwargs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def child(self, path: str) -> SwapContext:
        """The context of the child at ``path``, with the role the entry gives it."""
        return SwapContext(f"{self.name}.{path}", self.roles.get(path), self.spec, self.token_shape)

    def bits(self) -> tuple[int | None, int | None]:
        """(weight bits, input bits) of this layer; for a matmul, (A bits, B bits) = the input bits."""
        kind = _BITS_ROLE.get(self.role or "linear", "linear")
        w, a = self.spec.bits_for(self.name, kind)
        return (a, a) if kind == "matmul" else (w, a)


Constructor = Callable[[nn.Module, SwapContext], nn.Module]


@dataclass(frozen=True)
class Quantizable:
    """What the pipeline knows about one float module type.

    Attributes:
        float_type: the float module class (subclasses share the entry).
        quantize: builds the quantized form from the float module and a :class:`SwapContext`; ``None``
            for containers that stay as they are (blocks, whole models).
        quantized_type: the class ``quantize`` returns (its modules get this entry after the swap).
        role: the module's own role when no enclosing entry gives it one (``nn.Linear``: ``linear``).
        needs_role: swap the module only where an enclosing entry gives it a role (``nn.Conv2d``: only
            a patch embedding's projection is quantized).
        unit: ``patch_embed`` | ``block`` | ``merge`` when the module is a reconstruction unit.
        roles: child path -> role of the layers inside (``{"qkv": "qkv", "proj": "proj"}``).
        input: child path of the layer that consumes the module's input first (``"qkv"``, ``"fc1"``);
            a tuple when several linears read it (SwiGLU's ``("fc1_g", "fc1_x")``): a LayerNorm
            feeding the module folds into all of them. Paths a module lacks (a child that is
            ``None``: EVA's ``q_proj`` when its qkv is fused) are skipped.
        norms: LayerNorm child path -> child path of what it feeds (``{"norm1": "attn"}``); the fed
            module's ``input`` layers are followed down to a linear, the LayerNorm's fold partner.
        heads: child paths of the classifier layers (role ``head``, each a unit of kind ``head``);
            absent ones and ones without parameters (``nn.Identity``) are skipped.
        cls_token: the unit's output carries the model's class token first when the model has one
            (``model.cls_token``).
        keep_float: the module and everything inside it stay float (a relative position MLP outside
            the attention): never swapped, its linears never quantized.
    """

    float_type: type[nn.Module]
    quantize: Constructor | None = None
    quantized_type: type[nn.Module] | None = None
    role: Role | None = None
    needs_role: bool = False
    unit: Literal["patch_embed", "block", "merge"] | None = None
    roles: Mapping[str, Role] = field(default_factory=dict)
    input: str | tuple[str, ...] | None = None
    norms: Mapping[str, str] = field(default_factory=dict)
    heads: tuple[str, ...] = ()
    cls_token: bool = False
    keep_float: bool = False


_FLOAT: dict[type, Quantizable] = {}
_QUANTIZED: dict[type, Quantizable] = {}
_BUILTINS_LOADED = False


class Registration:
    """The handle :func:`register` returns: ``remove()`` takes its entries out again; as a context
    manager the entries are removed on exit."""

    def __init__(self, entries: tuple[Quantizable, ...]) -> None:
        self.entries = entries

    def remove(self) -> None:
        """Unregister the entries (those still registered by this handle)."""
        for e in self.entries:
            if _FLOAT.get(e.float_type) is e:
                del _FLOAT[e.float_type]
            if e.quantized_type is not None and _QUANTIZED.get(e.quantized_type) is e:
                del _QUANTIZED[e.quantized_type]

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register(*entries: Quantizable) -> Registration:
    """Register a model family: one :class:`Quantizable` per module type, all in one call.

    Either every entry is registered or none (a clash raises before anything changes).

    Args:
        *entries: the family's module types and what fimaq needs to know about them.

    Returns:
        A handle whose ``remove()`` unregisters the family; used as a context manager it does so on
        exit (for tests and scoped experiments).

    Raises:
        FimaqError: a float or quantized type is already registered.

    Example::

        register(
            Quantizable(MyAttention, quantize=my_quant_attention, quantized_type=MyQuantAttention,
                        roles={"qkv": "qkv", "proj": "proj", "matmul1": "matmul1", "matmul2": "matmul2"},
                        input="qkv"),
            Quantizable(MyMlp, roles={"fc1": "fc1", "fc2": "fc2"}, input="fc1"),
            Quantizable(MyBlock, unit="block", norms={"norm1": "attn", "norm2": "mlp"}, cls_token=True),
            Quantizable(MyViT, heads=("head",)),
        )
    """
    _load_builtins()
    return _add(entries)


def _add(entries: tuple[Quantizable, ...]) -> Registration:
    seen: set[type] = set()
    for e in entries:
        for t, table in ((e.float_type, _FLOAT), (e.quantized_type, _QUANTIZED)):
            if t is None:
                continue
            if t in table or t in seen:
                raise FimaqError(f"{t.__qualname__} is already registered as a quantizable module type")
            seen.add(t)
        if e.quantize is not None and e.quantized_type is None:
            raise FimaqError(f"{e.float_type.__qualname__}: an entry with a constructor needs quantized_type")
    for e in entries:
        _FLOAT[e.float_type] = e
        if e.quantized_type is not None:
            _QUANTIZED[e.quantized_type] = e
    return Registration(tuple(entries))


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        from fimaq.models.timm_families import timm_families

        _add(timm_families())
        _BUILTINS_LOADED = True


def lookup(module: nn.Module) -> tuple[Quantizable, bool] | None:
    """The entry of ``module`` and whether the module is its quantized form; ``None`` if unregistered."""
    _load_builtins()
    for cls in type(module).__mro__:
        if cls in _QUANTIZED:
            return _QUANTIZED[cls], True
        if cls in _FLOAT:
            return _FLOAT[cls], False
    return None


def entry_of(module: nn.Module) -> Quantizable | None:
    """The entry describing ``module`` (float or quantized form), ``None`` if unregistered."""
    found = lookup(module)
    return found[0] if found is not None else None


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _heads(model: nn.Module, name: str, entry: Quantizable) -> Iterator[str]:
    for path in entry.heads:
        head = _get(model, _join(name, path))
        if head is not None and any(True for _ in head.parameters()):
            yield _join(name, path)


def declared_roles(model: nn.Module) -> dict[str, Role]:
    """Qualified name -> role of every layer an enclosing entry gives a role (inner entries win)."""
    roles: dict[str, Role] = {}
    for name, mod in model.named_modules():
        entry = entry_of(mod)
        if entry is None:
            continue
        roles.update({_join(name, path): role for path, role in entry.roles.items()})
        roles.update({head: "head" for head in _heads(model, name, entry)})
    return roles


def role_of(name: str, module: nn.Module, declared: Mapping[str, Role]) -> Role | None:
    """A module's role: the one an enclosing entry gives it, else its own entry's ``role``."""
    if name in declared:
        return declared[name]
    entry = entry_of(module)
    return entry.role if entry is not None else None


def input_linears(model: nn.Module, name: str) -> list[str]:
    """The linears that read the input of module ``name``, following ``input`` paths; empty when a
    path ends at something else (then nothing may fold into them)."""
    mod = _get(model, name)
    if mod is None:
        return []
    if isinstance(mod, nn.Linear):
        return [name]
    entry = entry_of(mod)
    if entry is None or entry.input is None:
        return []
    paths = (entry.input,) if isinstance(entry.input, str) else entry.input
    found = [_join(name, p) for p in paths if _get(model, _join(name, p)) is not None]
    linears = [inner for path in found for inner in input_linears(model, path)]
    return linears if found and len(linears) >= len(found) else []


def fold_partners(model: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """First reader (in model order) of each LayerNorm fold -> (the LayerNorm's qualified name, the
    other linears that read the same LayerNorm output, which the fold compensates too)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    partners: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, mod in model.named_modules():
        entry = entry_of(mod)
        for norm, target in (entry.norms if entry is not None else {}).items():
            readers = sorted(input_linears(model, _join(name, target)), key=order.__getitem__)
            if readers and isinstance(_get(model, _join(name, norm)), nn.LayerNorm):
                partners[readers[0]] = (_join(name, norm), tuple(readers[1:]))
    return partners


def require_family(model: nn.Module, what: str | None = None) -> None:
    """Refuse a model none of whose modules is a registered transformer block.

    Raises:
        FimaqError: naming the model (``what``, else its class) and how to add its family.
    """
    if not any(getattr(entry_of(m), "unit", None) == "block" for m in model.modules()):
        name = what or type(model).__name__
        raise FimaqError(
            f"{name} has no registered transformer block: unsupported model (its family can be added "
            "with fimaq.models.register)"
        )


@dataclass(frozen=True)
class UnitInfo:
    """A reconstruction unit found by :func:`find_units`."""

    name: str
    module: nn.Module
    kind: UnitKind
    has_cls_token: bool = False


def find_units(model: nn.Module) -> list[UnitInfo]:
    """The model's reconstruction units in ``named_modules`` order (units inside units are skipped)."""
    heads: set[str] = set()
    units: list[UnitInfo] = []
    has_cls = getattr(model, "cls_token", None) is not None
    for name, mod in model.named_modules():
        if any(name.startswith(u.name + ".") for u in units[-1:]):
            continue
        entry = entry_of(mod)
        if entry is not None:
            heads.update(_heads(model, name, entry))
        if name in heads:
            units.append(UnitInfo(name, mod, "head"))
        elif entry is not None and entry.unit is not None:
            units.append(UnitInfo(name, mod, entry.unit, entry.cls_token and has_cls))
    return units
