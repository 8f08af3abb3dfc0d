"""fimaq: post-training quantization of timm Vision Transformers (FIMA-Q, LampQ) on PyTorch Lightning."""

from fimaq._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

_LAZY = {"load_quantized": "fimaq.export"}


def __getattr__(name: str) -> object:
    """``fimaq.load_quantized`` without importing torch/timm at ``import fimaq``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fimaq' has no attribute {name!r}")
