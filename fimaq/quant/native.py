"""fimaq's native kernels in C++ (``native.cpp``), each the eager computation's values bit for bit:
fake quantization with both straight-through derivatives and the QDrop selection (the eager kernel
of :mod:`fimaq.quant.ste`), and a reconstruction step's QDrop mix of its cached inputs
(:mod:`fimaq.recon.module`). They take pointers and sizes only: no symbol of torch's libraries.

On the CPU eager PyTorch makes one pass over memory per operation, about ten per quantizer; a
fused pass reads its inputs once and writes its results once. The library
is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``/``g++``; about a
second) into ``$FIMAQ_CACHE`` (default ``~/.cache/fimaq``) and loaded with ``ctypes``; it runs on
torch's OpenMP threads (``torch.get_num_threads()``). Without a compiler, or with
``FIMAQ_NATIVE=0``, everything runs eager PyTorch: the same values, more passes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fimaq.quant.fake_quant import broadcasts_to

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
MAX_DIMS = 8
# no contraction into FMA, no fast-math: each operation rounded as its eager counterpart. Without
# errno and traps the compiler may select between computed values (branch-free, vectorised).
_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-ffp-contract=off", "-fno-fast-math"]
_FLAGS += ["-fno-math-errno", "-fno-trapping-math"]

_P, _F, _I, _N = ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_int64
_DIMS = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {  # every function returns 0, or a nonzero status for arguments it refuses
    "fimaq_fake_quant": [_P] * 7 + [_F, _I, _I] + [_DIMS] * 6 + [_I],
    "fimaq_fake_quant_backward": [_P] * 3 + [_N, _I],
    "fimaq_mix_rows": [_P, _P, _P, _N, _P, _I, _P, _N, _N, _I],
}

_lib: ctypes.CDLL | None = None
_tried = False
_enabled = os.environ.get("FIMAQ_NATIVE", "1") != "0"


def _arch_flags() -> list[str]:
    """Vector instructions as wide as torch's own kernels use here (``ATEN_CPU_CAPABILITY`` included);
    no FMA (no contraction either): the values are the same whatever the width."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return ["-mavx2"]
    return ["-msse4.1"]  # rounding in vector registers; every x86-64 CPU that runs torch has it


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("FIMAQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fimaq")
    return Path(root)


def _build() -> Path | None:
    cxx = _compiler()
    if cxx is None or not SOURCE.is_file():
        return None
    flags = _FLAGS + _arch_flags()
    identity = SOURCE.read_bytes() + " ".join([cxx, *flags, sys.platform]).encode()
    key = hashlib.sha256(identity).hexdigest()[:16]
    for root in (_cache_dir(), Path(tempfile.gettempdir()) / "fimaq-cache"):
        target = root / f"fake_quant_{key}.so"
        if target.is_file():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
        except OSError:
            continue
        try:
            subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=300
            )
            os.replace(tmp, target)  # atomic: processes building at once all load a whole file
            return target
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.info("fimaq: the native kernels did not compile (%s); eager passes", detail[:300])
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None where it cannot be (or is switched off)."""
    global _lib, _tried
    if not _enabled:
        return None
    if not _tried:
        _tried = True
        path = _build()
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
                for name, argtypes in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = ctypes.c_int, argtypes
                _lib = lib
            except (OSError, AttributeError) as exc:
                log.info("fimaq: the native kernels did not load (%s); eager passes", exc)
    return _lib


def _call(name: str, *args) -> None:
    """Run one kernel of the library (callers checked that it is there)."""
    status = getattr(library(), name)(*args)
    if status != 0:
        raise RuntimeError(f"fimaq native {name} refused its arguments (status {status})")


@contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Use (or, with False, do not use) the native kernel inside the block."""
    global _enabled
    previous, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = previous


def applies(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> bool:
    """Whether the kernel can quantize ``x``: float32 on the CPU, scale and zero point float32 of
    shapes that broadcast to ``x``'s, at most eight dimensions, and the library available."""
    if not (_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and 0 < x.dim() <= MAX_DIMS):
        return False
    if torch.compiler.is_compiling():  # (a traced step fuses the written-out operations instead)
        return False
    if scale.dtype != torch.float32 or zp.dtype != torch.float32 or scale.device != x.device:
        return False
    if not (broadcasts_to(scale.shape, x.shape) and broadcasts_to(zp.shape, x.shape)):
        return False
    return library() is not None


def _strides(t: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides broadcast to ``x``'s shape (0 along broadcast dimensions)."""
    lead = x.dim() - t.dim()
    shape = x.shape
    return (0,) * lead + tuple(
        0 if t.shape[d] == 1 and shape[lead + d] != 1 else t.stride(d) for d in range(t.dim())
    )


_walks: dict[tuple, tuple] = {}


def _walk(shape, out_strides, *operand_strides):
    """The shape and each operand's strides (None: absent, zeros) as ``ctypes`` arrays, dimensions in
    the outputs' memory order (outermost first); the shape, then the operands, then the outputs'.
    Cached: a block asks for the same few layouts every step."""
    key = (tuple(shape), tuple(out_strides), operand_strides)
    walk = _walks.get(key)
    if walk is None:
        nd = len(shape)
        order = sorted(range(nd), key=lambda d: (-out_strides[d], d))
        lists = [shape, *(st if st is not None else (0,) * nd for st in operand_strides), out_strides]
        walk = tuple((ctypes.c_int64 * nd)(*[int(v[d]) for d in order]) for v in lists)
        if len(_walks) > 4096:
            _walks.clear()
        _walks[key] = walk
    return walk


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    qmax: int,
    keep: torch.Tensor | None,
    threshold: int,
    out: torch.Tensor,
    dx: torch.Tensor | None = None,
    ds: torch.Tensor | None = None,
) -> None:
    """Fill ``out`` (and ``dx``, ``ds``: both or neither) for ``x`` (see ``native.cpp``); ``keep``
    holds QDrop bytes (``uint8`` of ``x``'s shape, the element keeps its quantized value where
    ``byte < threshold``) or is None. ``out``, ``dx`` and ``ds`` share one layout; callers check
    :func:`applies`."""
    scale = scale.detach()
    zp = zp.detach()
    if keep is not None:
        assert keep.dtype == torch.uint8 and keep.shape == x.shape
    bytes_strides = tuple(keep.stride()) if keep is not None else None
    walk = _walk(x.shape, out.stride(), x.stride(), _strides(scale, x), _strides(zp, x), bytes_strides)
    _call(
        "fimaq_fake_quant",
        x.data_ptr(),
        scale.data_ptr(),
        zp.data_ptr(),
        keep.data_ptr() if keep is not None else None,
        out.data_ptr(),
        dx.data_ptr() if dx is not None else None,
        ds.data_ptr() if ds is not None else None,
        float(qmax),
        int(threshold),
        x.dim(),
        *walk,
        torch.get_num_threads(),
    )


def backward_applies(g: torch.Tensor, ds: torch.Tensor) -> bool:
    """Whether :func:`backward` can take ``g``: float32 on the CPU, laid out like the saved ``ds``
    (a dense buffer of the forward's)."""
    return (
        g.dtype == torch.float32
        and g.device.type == "cpu"
        and g.shape == ds.shape
        and g.stride() == ds.stride()
    )


def backward(
    g: torch.Tensor, dx: torch.Tensor, ds: torch.Tensor, want_x: bool, want_s: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(g * dx, g * ds)`` in one pass into the saved buffers (``None`` where not wanted). Callers
    check :func:`backward_applies`."""
    _call(
        "fimaq_fake_quant_backward",
        g.data_ptr(),
        dx.data_ptr() if want_x else None,
        ds.data_ptr() if want_s else None,
        g.numel(),
        torch.get_num_threads(),
    )
    return (dx if want_x else None), (ds if want_s else None)


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the flat kernels (soft weight, rounding penalty) take these: float32, contiguous, on
    the CPU, and the library available."""
    ok = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    return _enabled and ok and not torch.compiler.is_compiling() and library() is not None


def mix_rows(
    a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor, threshold: int
) -> torch.Tensor:
    """``torch.lerp(a[idx], b[idx], mask)`` with the 0/1 mask ``keep < threshold`` of the bytes ``keep``
    (``uint8`` of the result's shape), in one pass without the gathered copies or the float mask
    (``a``, ``b``: see :func:`takes`; ``idx``: row indices)."""
    rows = idx.numel()
    out = torch.empty((rows, *a.shape[1:]), dtype=a.dtype)
    idx = idx.to(torch.int64).contiguous()
    assert keep.dtype == torch.uint8 and keep.shape == out.shape and keep.is_contiguous()
    cols = out.numel() // max(rows, 1)
    _call(
        "fimaq_mix_rows",
        a.data_ptr(), b.data_ptr(), idx.data_ptr(), a.shape[0], keep.data_ptr(), int(threshold),
        out.data_ptr(), rows, cols, torch.get_num_threads(),
    )  # fmt: skip
    return out
