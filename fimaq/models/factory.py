"""Create a float timm ViT / DeiT / Swin from a name, keyword overrides and a local checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.errors import FimaqError

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("vit_", "deit_", "deit3_", "swin_")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling code: safetensors, or ``torch.load(weights_only=True)``.

    Args:
        path: ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file holding a state dict (optionally
            nested under ``state_dict``, ``model`` or ``module``).
    """
    path = Path(path)
    if not path.is_file():
        raise FimaqError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FimaqError:
        raise
    except Exception as exc:  # corrupt or truncated file, or a pickle with code in it
        raise FimaqError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FimaqError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), first: {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[0]}")
        raise FimaqError(f"checkpoint {path} does not fit arch '{arch}': " + "; ".join(parts))
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FimaqError(f"checkpoint {path} holds NaN or Inf values in '{k}'")


def create_fp_model(
    arch: str,
    checkpoint_path: str | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a float timm model in eval mode.

    Args:
        arch: timm model name of the ViT, DeiT or Swin family (e.g. ``deit_small_patch16_224``).
        checkpoint_path: local weights (safetensors or a plain state dict); loaded strictly.
        pretrained: download timm's pretrained weights (needs network access); off by default.
        model_kwargs: keyword overrides for ``timm.create_model`` (img_size, depth, num_classes, ...).
    """
    import timm

    if not timm.is_model(arch):
        raise FimaqError(f"unknown arch '{arch}': not a timm model name")
    if not arch.startswith(SUPPORTED_FAMILIES):
        raise FimaqError(
            f"arch '{arch}' is not a ViT, DeiT or Swin model (supported prefixes: {SUPPORTED_FAMILIES})"
        )
    kwargs = dict(model_kwargs or {})
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise FimaqError(f"bad model_kwargs for '{arch}': {exc}") from None
    if checkpoint_path:
        state = load_state_dict_file(checkpoint_path)
        _check_state_dict(model, state, arch, str(checkpoint_path))
        model.load_state_dict(state, strict=True)
    elif not pretrained:
        log.warning("no checkpoint_path given for %s: the model keeps its random initialisation", arch)
    return model.eval()
