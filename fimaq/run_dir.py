"""A run folder (``trainer.default_root_dir``): what it may already hold, who owns it, and its
``metrics.json``.

:func:`check_run_dir` refuses a folder that holds a run of another model. A folder is owned by one
fimaq process at a time: the owner holds ``<root>/.fimaq.lock``, a small JSON file with its PID and
host, created exclusively (``O_EXCL``). A second run into the same folder is refused with one line
naming the owner; a lock left by a dead process on this host is taken over with a warning.
Data-parallel ranks share the lock of rank 0 (only rank 0 takes it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fimaq.artifacts import read_meta
from fimaq.errors import FimaqError, one_line
from fimaq.files import atomic_write_bytes, pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".fimaq.lock"

RUN_FILES = (
    "calib_state.safetensors",
    "calibrated.safetensors",
    "recon_state.safetensors",
    "quantized.safetensors",
)


def check_run_dir(root: str | Path, meta: dict[str, Any]) -> None:
    """Refuse a run folder that holds artifacts of another model or bit-width (never overwrite them)."""
    for name in RUN_FILES:
        path = Path(root) / name
        if not path.is_file():
            continue
        try:
            saved = read_meta(path) or {}
        except FimaqError as exc:
            raise FimaqError(f"{exc}; delete it or choose another trainer.default_root_dir") from None
        for key in ("arch", "model_kwargs", "quant"):
            if saved.get(key) != meta.get(key):
                raise FimaqError(
                    f"{root} holds a run of another model ({name}: {key}={saved.get(key)}, this run has "
                    f"{key}={meta.get(key)}); choose another trainer.default_root_dir"
                )


def _folder_problem(root: Path, exc: OSError) -> str:
    """Why a run folder cannot be created or written, and what to do, in a few words."""
    hint = "; choose another trainer.default_root_dir"
    if root.exists() and not root.is_dir():
        return f"it is a file, not a folder{hint}"
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder{hint}"
            break
    reason = exc.strerror or str(exc)
    return f"{reason} ({exc.filename}){hint}, or make it writable"


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as ownerless below


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return True


@contextlib.contextmanager
def run_lock(root: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of run folder ``root`` for the duration of the block (``enabled=False``: no-op,
    for data-parallel ranks other than 0).

    Raises:
        FimaqError: another live process (or one on another host) owns the folder.
    """
    if not enabled:
        yield
        return
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FimaqError(f"cannot use {root} as the run folder: {_folder_problem(root, exc)}") from None
    path = root / LOCK_NAME
    host = socket.gethostname()
    for _ in range(3):
        try:
            created = _create(path)
        except OSError as exc:
            raise FimaqError(f"cannot write in the run folder {root}: {_folder_problem(root, exc)}") from None
        if created:
            break
        owner = _owner(path)
        pid, where = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and where == host and pid != os.getpid() and not pid_alive(pid):
            log.warning("%s: taking over the lock of a run that is no longer alive (pid %d)", root, pid)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if not owner:
            raise FimaqError(
                f"{root} is locked by {path}, which names no owner; delete it if no run uses {root}"
            )
        raise FimaqError(
            f"{root} is in use by another fimaq run (pid {pid} on {where}); wait for it to finish or choose "
            f"another trainer.default_root_dir (if that run is gone, delete {path})"
        )
    else:
        raise FimaqError(f"could not take the lock {path}: other runs keep creating it")
    try:
        yield
    finally:
        if _owner(path).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


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
