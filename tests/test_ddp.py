"""Data parallel: row bookkeeping and masks (pure), then 2 CPU processes (gloo) against 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fimaq.parallel import Ranks, shard_bounds
from fimaq.quant.ste import bernoulli_mask
from fimaq.recon.batches import BatchMasks, local_batch

ROOT = Path(__file__).resolve().parents[1]


def test_local_batches_partition_the_global_batch():
    idx = torch.tensor([7, 0, 11, 3, 5, 9])
    parts = [local_batch(idx, lo, hi) for lo, hi in (shard_bounds(12, 2, r) for r in range(2))]
    assert [p.real for p in parts] == [3, 3]
    # rank 0 holds rows 0..5, rank 1 rows 6..11 (local rows are offsets into the shard)
    assert parts[0].positions.tolist() == [1, 3, 4] and parts[0].rows.tolist() == [0, 3, 5]
    assert parts[1].positions.tolist() == [0, 2, 5] and parts[1].rows.tolist() == [1, 5, 3]
    empty = local_batch(torch.tensor([0, 1]), 6, 12)
    assert empty.real == 0 and empty.weights.tolist() == [0.0] and empty.total == 2


@pytest.mark.parametrize("per_image", [1, 3])
def test_sharded_masks_equal_the_one_process_mask(per_image):
    """Each rank draws the whole batch's mask and keeps its rows: the union is the 1-process mask,
    also with several rows per image (Swin windows, image-major)."""
    shape = (6 * per_image, 4, 5)
    full = bernoulli_mask(shape, 0.5, torch.Generator().manual_seed(3), torch.device("cpu"))
    idx = torch.tensor([7, 0, 11, 3, 5, 9])
    for lo, hi in ((0, 6), (6, 12)):
        rows = local_batch(idx, lo, hi)
        masks = BatchMasks(torch.Generator().manual_seed(3))
        with masks.of(rows):
            local = masks((rows.real * per_image, 4, 5), 0.5, torch.device("cpu"))
        assert masks.rows is None  # only while the block runs
        expect = full.view(6, per_image, 4, 5)[rows.positions].reshape(-1, 4, 5)
        assert torch.equal(local, expect)
        # the generator advanced exactly as one process drawing the whole mask
        again = torch.Generator().manual_seed(3)
        bernoulli_mask(shape, 0.5, again, torch.device("cpu"))
        assert torch.equal(masks.generator.get_state(), again.get_state())


def test_one_process_ranks_are_identities():
    t = torch.arange(6.0).view(3, 2)
    ranks = Ranks()
    assert ranks.world == 1 and ranks.rank == 0 and ranks.is_main
    assert ranks.shard(t) is t and ranks.gather_rows(t) is t and ranks.sum(t) is t
    assert ranks.shard_offsets(3) == (3, 0, 3)
    assert shard_bounds(10, 3, 2) == (6, 10)


def _fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    args = [
        sys.executable,
        str(ROOT / "main.py"),
        "fit",
        "-c",
        str(ROOT / "configs/digits/w3a3.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--model.calib.search_rounds=1",
        "--model.calib.num_images=16",
        "--data.init_args.calib_size=16",
        "--data.init_args.recon_size=48",
        "--model.recon.iters=4",
        "--model.recon.batch_size=8",
        "--model.fisher.rank=2",
        "--model.fisher.num_samples=20",
        "--model.fisher.batch_size=8",
        *extra,
    ]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_python_trainer_that_spawns_its_processes_is_refused_in_one_line(strategy):
    """The command line refuses these strategies by name; a Trainer built in Python is refused too,
    before any process starts."""
    import lightning as L

    from fimaq.errors import FimaqError

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False
    )
    with pytest.raises(FimaqError, match="not a strategy that starts its processes by"):
        Ranks.of_trainer(trainer)


def test_two_processes_match_one_process(tmp_path):
    """Same calibrated qparams and, up to float rounding, the same reconstruction (QDrop masks,
    Fisher refreshes and DPLR loss included) with 2 gloo processes as with 1 process."""
    from fimaq.artifacts import read_artifact

    _fit(tmp_path / "one")
    proc = _fit(tmp_path / "two", "--trainer.strategy=ddp", "--trainer.devices=2")
    assert "data parallel: 2 processes (gloo)" in proc.stdout + proc.stderr
    for name in ("calibrated", "quantized"):
        one, _ = read_artifact(tmp_path / "one" / f"{name}.safetensors")
        two, _ = read_artifact(tmp_path / "two" / f"{name}.safetensors")
        assert one.keys() == two.keys()
        for k in one:
            tol = 0.0 if name == "calibrated" else 1e-5
            assert torch.allclose(one[k], two[k], atol=tol, rtol=tol), (name, k)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("fp_top1", "calibrated_top1", "reconstructed_top1"):
        assert abs(m1[key] - m2[key]) <= 0.25, key  # the validation split may repeat a sample per rank
    # only rank 0 writes: one TensorBoard run, no stray temporary files
    assert len(list((tmp_path / "two").glob("version_*"))) == 1
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]


def test_sigterm_to_rank_0_stops_every_rank_with_one_line(tmp_path):
    """The other ranks stop with rank 0 (it passes the signal on) instead of failing in their next
    collective with a traceback; the run says one line and can be resumed."""
    import signal

    from runs import cli_cmd, signal_when

    root = tmp_path / "run"
    state = root / "calib_state.safetensors"
    log = tmp_path / "ddp.log"
    two = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    slow = ["--model.calib.search_rounds=3", "--model.calib.eq_n=128"]  # still calibrating at the signal
    rc = signal_when(cli_cmd("fit", root, *two, *slow), log, state.is_file, signal.SIGTERM)
    text = log.read_text()
    assert rc == 143, text
    assert "Traceback" not in text and "Connection closed" not in text, text
    last = text.rstrip("\n").split("\n")[-1]
    assert last.startswith("interrupted during calibration") and last.endswith(
        "run the same command again to resume"
    )
    assert text.count("interrupted") == 1
    deadline = time.monotonic() + 30
    while _processes_of(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_of(root) == []


def _processes_of(root: Path) -> list[int]:
    """The PIDs of processes whose command line names ``root``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if str(root).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found
