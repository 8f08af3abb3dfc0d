"""Writing files so that a kill at any moment leaves either the previous or the new version.

Every file a user may read later is written to a temporary file in the same folder, flushed to disk
and renamed over the target. Temporary files left by dead processes are removed on the next write.
"""

from __future__ import annotations

import glob
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fimaq.errors import FimaqError, one_line

TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give a new file (mkstemp gives 0600)


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
    An OSError (a full disk, a folder that refuses writes) becomes one FimaqError naming the file.

    Args:
        path: the file to (over)write; its folder is created if needed.
        write: called with the temporary file's path; must write the whole content there.
    """
    path = Path(path)
    existed = path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc, existed) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc, existed) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)
    remove_stale_temps(path)


def write_error(path: Path, exc: OSError, existed: bool) -> FimaqError:
    """One line for a file that could not be written (full disk, no permission): which file, why, and
    that the version before it is still there."""
    reason = exc.strerror or one_line(exc)
    kept = "its last good version is kept" if existed else "nothing was written"
    return FimaqError(f"could not write {path}: {reason}; {kept}")
