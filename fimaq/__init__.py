"""fimaq: post-training quantization of timm Vision Transformers (FIMA-Q, LampQ) on PyTorch Lightning."""

from fimaq._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

_LAZY = {
    "load_quantized": "fimaq.export",
    "Pipeline": "fimaq.pipeline",
    "QuantModel": "fimaq.module",
    "QuantSpec": "fimaq.spec",
    "CalibConfig": "fimaq.config",
    "ReconConfig": "fimaq.config",
    "FisherConfig": "fimaq.config",
    "MixedPrecisionConfig": "fimaq.config",
    "DigitsDataModule": "fimaq.data",
    "ImageNetDataModule": "fimaq.data",
    "PTQDataModule": "fimaq.data",
    "ProxyDataModule": "fimaq.data",
    "quantize_model": "fimaq.models.swap",
    "quant_mode": "fimaq.layers.mode",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    """The public API (``fimaq.Pipeline``, ``fimaq.QuantModel``, ...) without importing torch/timm at
    ``import fimaq``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fimaq' has no attribute {name!r}")
