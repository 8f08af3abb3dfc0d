"""What the benchmarks on the embedded default share: the model, its data and top-1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.artifacts import resolve_checkpoint
from fimaq.data import DigitsDataModule
from fimaq.files import atomic_write_bytes
from fimaq.models import create_fp_model

ARCH = "deit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=4, depth=4, num_classes=10)


def embedded_fp() -> torch.nn.Module:
    """A fresh float copy of the embedded digits DeiT."""
    return create_fp_model(ARCH, resolve_checkpoint("embedded:digits_deit_tiny"), model_kwargs=KWARGS)


def digits_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Calibration, reconstruction and validation tensors (images, labels) of the digits data."""
    dm = DigitsDataModule()
    dm.setup()
    return {
        "calib": dm.calibration_tensors(),
        "recon": dm.reconstruction_tensors(),
        "val": dm.val_tensors(),
    }


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


def load_results(path: str | Path) -> dict[str, Any]:
    """The results a previous (possibly stopped) run of a benchmark wrote, or an empty dict."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: str | Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON, atomically (a stopped run keeps what it had)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1)
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
