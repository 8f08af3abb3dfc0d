"""Create a float timm model of a registered family from a name, keyword overrides and a local
checkpoint."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.artifacts import check_finite, check_state_dict, safetensors_error
from fimaq.errors import FimaqError, one_line
from fimaq.models.registry import require_family

log = logging.getLogger(__name__)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling code: safetensors, or ``torch.load(weights_only=True)``.

    Args:
        path: ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file holding a state dict (optionally
            nested under ``state_dict``, ``model`` or ``module``).

    Raises:
        FimaqError: the file is missing, truncated, not a state dict of tensors, or holds pickled
            Python objects (refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FimaqError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise safetensors_error(path, exc, "checkpoint") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():  # a damaged pickle stream
                raise FimaqError(f"checkpoint {path} is truncated or corrupt ({one_line(exc)})") from None
            refused = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"refused global {refused.group(1)}" if refused else one_line(exc)
            raise FimaqError(  # a pickle with code (or other objects) in it, or not a checkpoint at all
                f"checkpoint {path} is not a plain state dict of tensors: it holds other pickled objects "
                f"({what}), and fimaq never unpickles code"
            ) from None
        except Exception as exc:  # truncated, or not a torch file at all
            with open(path, "rb") as f:
                head = f.read(16)
            if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor a pickle
                raise FimaqError(
                    f"checkpoint {path} is not a PyTorch or safetensors file (it starts with {head[:12]!r})"
                ) from None
            raise FimaqError(
                f"checkpoint {path} is truncated or not a PyTorch/safetensors state dict ({one_line(exc)})"
            ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise FimaqError(f"checkpoint {path} does not hold a state dict of tensors")
    if not state:
        raise FimaqError(f"checkpoint {path} holds no tensors")
    return state


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: str) -> None:
    check_state_dict(model.state_dict(), state, f"checkpoint {path}", f"arch '{arch}'")
    check_finite(state, f"checkpoint {path}")


def create_fp_model(
    arch: str,
    checkpoint_path: str | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    weights_follow: bool = False,
) -> nn.Module:
    """Build a float timm model in eval mode.

    Args:
        arch: timm model name of a registered family (e.g. ``deit_small_patch16_224``).
        checkpoint_path: local weights (safetensors or a plain state dict); loaded strictly.
        pretrained: download timm's pretrained weights (needs network access); off by default.
        model_kwargs: keyword overrides for ``timm.create_model`` (img_size, depth, num_classes, ...).
        weights_follow: the caller loads the weights itself (a quantized artifact): no warning about
            the random initialisation.
    """
    import timm

    if not timm.is_model(arch):
        raise FimaqError(f"unknown arch '{arch}': not a timm model name")
    kwargs = dict(model_kwargs or {})
    try:
        model = timm.create_model(arch, **kwargs)
    except Exception as exc:  # timm reports bad kwargs as TypeError, AssertionError, ValueError, ...
        raise FimaqError(f"timm rejects model_kwargs {kwargs} for '{arch}': {one_line(exc)}") from None
    require_family(model, f"arch '{arch}' ({type(model).__name__})")
    if pretrained:
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as exc:  # no network, no such weights, a hub error
            raise FimaqError(
                f"could not fetch timm's pretrained weights for '{arch}' ({one_line(exc)}); without "
                "network access give the float weights as a file with --model.checkpoint_path"
            ) from None
    if checkpoint_path:
        state = load_state_dict_file(checkpoint_path)
        _check_state_dict(model, state, arch, str(checkpoint_path))
        model.load_state_dict(state, strict=True)
    elif not pretrained and not weights_follow:
        log.warning("no checkpoint_path given for %s: the model keeps its random initialisation", arch)
    return model.eval()
