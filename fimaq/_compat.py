"""Import-order compatibility for CPU-only installs of torchvision.

The registry's torchvision wheel for torch 2.13 is built against CUDA. With the CPU build of torch its
compiled library does not load, yet ``torchvision._meta_registrations`` still registers fake kernels
for ``torchvision::nms`` and ``torchvision::qnms``, which fails because those operators were never
defined. This module is imported before torchvision (and timm): when torchvision's own library loads
it does nothing; otherwise it defines the two operator schemas, so
that transforms, datasets and all of timm import. Compiled ops such as ``decode_image`` stay
unavailable; fimaq decodes images with PIL.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

_LIBRARIES: list = []  # keeps the torch.library.Library objects alive
_DONE = False


def _torchvision_library_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # torchvision absent: nothing to fix
    lib_dir = Path(spec.origin).parent
    candidates = sorted(lib_dir.glob("_C*.so")) + sorted(lib_dir.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError, ImportError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work on a CPU-only torch; a no-op where its library loads."""
    global _DONE
    if _DONE or "torchvision" in sys.modules:
        _DONE = True
        return
    _DONE = True
    if _torchvision_library_loads():
        return
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - schema only
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(lib)
    os.environ.setdefault("TORCHVISION_DISABLE_VIDEO_API", "1")
