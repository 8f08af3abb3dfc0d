"""Files a run writes: quantized state dicts with metadata (safetensors) and metrics.json, atomically.

Every file a user may read later is written to a temporary file in the same folder, flushed to disk
and renamed over the target, so a kill at any moment leaves either the previous or the new version.
Readers never unpickle anything and turn truncated, foreign or non-finite files into one-line
:class:`~fimaq.errors.FimaqError` messages.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fimaq.errors import FimaqError, one_line

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ASSETS = Path(__file__).parent / "assets"
EMBEDDED_PREFIX = "embedded:"
TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give a new file (mkstemp gives 0600)


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


# ----------------------------------------------------------------------------- atomic writes
def _fsync(path: str | Path, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; best effort where the OS does not allow it."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files of ``path`` whose writer (a process on this host) is gone.

    A writer killed between creating its temporary file and renaming it leaves the file behind; it
    is never read, only wasted space. Temporary files of running writers are kept.

    Args:
        path: the target file whose leftovers are removed.

    Returns:
        The removed files.
    """
    path = Path(path)
    head, host = f".{path.name}.", socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(head)}*{TMP_SUFFIX}"):
        parts = tmp.name[len(head) : -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # not ours to delete: leave it
            continue
        removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | Path, write: Callable[[str], Any]) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it over ``path``.

    On any error (or a KeyboardInterrupt) the temporary file is removed and ``path`` is left as it
    was; a kill leaves at most a hidden ``.NAME.*.tmp`` file, removed by the next write of ``path``.

    Args:
        path: the file to (over)write; its folder is created if needed.
        write: called with the temporary file's path; must write the whole content there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)
    remove_stale_temps(path)


def save_quantized(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save a quantized model's state dict with JSON metadata (arch, bits, stage, schema version)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    header = {"fimaq": json.dumps({"schema_version": SCHEMA_VERSION, **meta}, sort_keys=True)}
    atomic_write_bytes(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


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


def update_metrics(root: str | Path, values: dict[str, Any], seconds: dict[str, float] | None = None) -> dict:
    """Merge ``values`` (and per-stage wall ``seconds``) into ``<root>/metrics.json`` (atomically).

    An unreadable metrics.json (edited by hand) is kept as ``metrics.json.corrupt`` and started over.
    """
    path = Path(root) / "metrics.json"
    data: Any = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            data = one_line(exc)
        if not isinstance(data, dict):
            backup = path.with_name(path.name + ".corrupt")
            log.warning("%s is not a JSON object (%s): kept as %s, starting over", path, data, backup)
            os.replace(path, backup)
            data = {}
    data.update(values)
    if seconds:
        if not isinstance(data.get("seconds"), dict):
            data["seconds"] = {}
        data["seconds"].update({k: round(v, 3) for k, v in seconds.items()})
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
    return data
