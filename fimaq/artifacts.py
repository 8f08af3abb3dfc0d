"""Files a run writes: quantized state dicts with metadata (safetensors) and metrics.json, atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fimaq.errors import FimaqError

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


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_quantized(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save a quantized model's state dict with JSON metadata (arch, bits, stage, schema version)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    header = {"fimaq": json.dumps({"schema_version": SCHEMA_VERSION, **meta}, sort_keys=True)}
    atomic_write_bytes(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def read_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_quantized`: (state dict, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FimaqError(f"artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("fimaq")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise FimaqError(f"cannot read artifact {path}: {type(exc).__name__}: {exc}") from None
    if meta_raw is None:
        raise FimaqError(f"{path} is not a fimaq artifact (no fimaq metadata)")
    meta = json.loads(meta_raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise FimaqError(
            f"{path} has schema version {meta.get('schema_version')}, this fimaq reads {SCHEMA_VERSION}"
        )
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FimaqError(f"artifact {path} holds NaN or Inf values in '{k}'")
    return state, meta


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The fimaq metadata of an artifact (without loading its tensors); None if it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fimaq")
    except Exception as exc:
        raise FimaqError(f"cannot read artifact {path}: {type(exc).__name__}: {exc}") from None
    return json.loads(raw) if raw else None


RUN_FILES = ("calibrated.safetensors", "recon_state.safetensors", "quantized.safetensors")


def check_run_dir(root: str | Path, meta: dict[str, Any]) -> None:
    """Refuse a run folder that holds artifacts of another model or bit-width (never overwrite them)."""
    for name in RUN_FILES:
        path = Path(root) / name
        if not path.is_file():
            continue
        saved = read_meta(path) or {}
        for key in ("arch", "model_kwargs", "quant"):
            if saved.get(key) != meta.get(key):
                raise FimaqError(
                    f"{root} holds a run of another model ({name}: {key}={saved.get(key)}, this run has "
                    f"{key}={meta.get(key)}); choose another trainer.default_root_dir"
                )


def update_metrics(root: str | Path, values: dict[str, Any], seconds: dict[str, float] | None = None) -> dict:
    """Merge ``values`` (and per-stage wall ``seconds``) into ``<root>/metrics.json``."""
    path = Path(root) / "metrics.json"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.update(values)
    if seconds:
        data.setdefault("seconds", {}).update({k: round(v, 3) for k, v in seconds.items()})
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
    return data
