"""Running fimaq's command line as a user would, in a child process: the small settings of a quick
``fit`` of the embedded default, and a signal sent once the run has reached a given point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fimaq.artifacts import read_meta

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits/w3a3.yaml"
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {
    **{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES},  # (a data-parallel test's)
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}
FAST_FIT = [
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--model.calib.search_rounds=0",
    "--model.calib.eq_n=32",
    "--model.calib.num_images=16",
    "--data.init_args.calib_size=16",
    "--data.init_args.recon_size=32",
    "--trainer.limit_val_batches=1",
    "--data.init_args.val_batch_size=32",
    "--model.recon.iters=10",
    "--model.recon.batch_size=8",
    "--model.fisher.rank=2",
    "--model.fisher.num_samples=16",
    "--model.fisher.batch_size=16",
    "--validate_fp=false",
]


def cli_cmd(
    command: str, root: Path, *extra: str, logger: bool = False, fast: list[str] = FAST_FIT
) -> list[str]:
    """``main.py COMMAND -c configs/digits/w3a3.yaml`` into ``root`` with the quick settings."""
    args = fast if not logger else [a for a in fast if a != "--trainer.logger=false"]
    return [
        sys.executable,
        str(ROOT / "main.py"),
        command,
        "-c",
        str(DIGITS),
        f"--trainer.default_root_dir={root}",
        *args,
        *extra,
    ]


def fit_cmd(root: Path, *extra: str, logger: bool = False) -> list[str]:
    return cli_cmd("fit", root, *extra, logger=logger)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end; the test fails with its output unless it exits 0."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def signal_when(cmd: list[str], log: Path, ready: Callable[[], bool], sig: int) -> int:
    """Run ``cmd``, send ``sig`` once ``ready()`` holds, return the exit status."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before the signal:\n{log.read_text()}")
                if ready():
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"not ready in time:\n{log.read_text()}")
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode


def state_meta(state: Path) -> dict:
    """The metadata of a resumable state (empty while there is none, or while it is being replaced)."""
    try:
        return (read_meta(state) or {}) if state.is_file() else {}
    except Exception:  # caught between the write and the rename of a new version
        return {}


def units_done(state: Path) -> list[str]:
    return list(state_meta(state).get("units_done", []))
