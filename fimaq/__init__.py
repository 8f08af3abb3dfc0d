"""fimaq: post-training quantization of timm Vision Transformers (FIMA-Q, LampQ) on PyTorch Lightning."""

from fimaq._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
