"""The artifact schema: quantized state dicts with their metadata (safetensors), written atomically.

Readers never unpickle anything and turn truncated, foreign or non-finite files into one-line
:class:`~fimaq.errors.FimaqError` messages. ``embedded:NAME`` names a checkpoint shipped with fimaq.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fimaq.errors import FimaqError, one_line
from fimaq.files import atomic_write_bytes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ASSETS = Path(__file__).parent / "assets"
EMBEDDED_PREFIX = "embedded:"


def resolve_checkpoint(path: str | None) -> str | None:
    """``embedded:NAME`` -> the checkpoint shipped in ``fimaq/assets/NAME.safetensors``."""
    if path and path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX) :]
        target = ASSETS / f"{name}.safetensors"
        if not target.is_file():
            known = sorted(p.stem for p in ASSETS.glob("*.safetensors"))
            raise FimaqError(f"unknown embedded checkpoint '{name}' (available: {known})")
        return str(target)
    return path


def save_quantized(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save a quantized model's state dict with JSON metadata (arch, bits, stage, schema version)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    header = {"fimaq": json.dumps({"schema_version": SCHEMA_VERSION, **meta}, sort_keys=True)}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=header)
        except OSError:
            raise
        except Exception as exc:  # safetensors reports the OS's refusal (a full disk) as its own error
            found = re.search(r"(.+?) \(os error (\d+)\)", str(exc))
            if not found:
                raise
            raise OSError(int(found.group(2)), found.group(1).split(": ")[-1].strip()) from None

    atomic_write_bytes(Path(path), write)


# ----------------------------------------------------------------------------- reading
def safetensors_error(path: str | Path, exc: Exception, what: str = "artifact") -> FimaqError:
    """A one-line FimaqError for a safetensors file that cannot be opened."""
    if isinstance(exc, OSError):
        return FimaqError(f"cannot read {what} {path}: {one_line(exc)}")
    return FimaqError(f"{what} {path} is truncated or not a safetensors file ({one_line(exc)})")


def _parse_meta(path: Path, raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise FimaqError(f"{path} has corrupt fimaq metadata ({one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise FimaqError(f"{path} has corrupt fimaq metadata (a {type(meta).__name__}, not a mapping)")
    return meta


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse NaN or Inf in any floating-point tensor of ``state``, naming the first such key.

    Args:
        state: tensors by name.
        what: the file, as the message names it (e.g. ``"checkpoint model.pth"``).
    """
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FimaqError(f"{what} holds NaN or Inf values in '{key}'")


def check_state_dict(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str, target: str, show: int = 3
) -> None:
    """Refuse a state dict whose keys or shapes differ from a model's, naming the first few of each.

    Args:
        own: the model's ``state_dict()``.
        state: the loaded tensors.
        what: the file, as the message names it (e.g. ``"checkpoint model.pth"``).
        target: what it should fit (e.g. ``"arch 'deit_tiny_patch16_224'"``).
        show: how many keys of each kind the message names.
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (
        ("shape mismatch(es) (file vs model)", wrong),
        ("missing key(s)", missing),
        ("unexpected key(s)", unexpected),
    ):
        if items:
            more = ", ..." if len(items) > show else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:show])}{more}")
    if parts:
        raise FimaqError(f"{what} does not fit {target}: " + "; ".join(parts))


def read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_quantized`: (state dict, metadata).

    Raises:
        FimaqError: the file is missing, truncated, not a fimaq artifact, of another schema version,
            or holds NaN/Inf values.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FimaqError(f"artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("fimaq")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise safetensors_error(path, exc) from None
    meta = _parse_meta(path, meta_raw)
    if meta is None:
        raise FimaqError(f"{path} is not a fimaq artifact (no fimaq metadata)")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FimaqError(f"{path} has schema version {version}, this fimaq reads version {SCHEMA_VERSION}")
    check_finite(state, f"artifact {path}")
    return state, meta


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The fimaq metadata of an artifact (without loading its tensors); None if it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fimaq")
    except Exception as exc:
        raise safetensors_error(path, exc) from None
    return _parse_meta(Path(path), raw)
