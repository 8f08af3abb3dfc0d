"""Faults a user meets outside fimaq's own files: run folders that cannot be written, a full disk,
data folders whose classes do not fit the model, options that cannot work. Each ends in one
``error:`` line (exit 2), before any work, and nothing finished is lost."""

import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import DIGITS, ENV, FAST_FIT, ROOT, cli_cmd, state_meta

from fimaq.artifacts import read_artifact, save_quantized
from fimaq.cli import main
from fimaq.errors import FimaqError
from fimaq.files import atomic_write_bytes

CALIBRATE = ["calibrate", "-c", str(DIGITS), *FAST_FIT]


def _error(capsys, args: list[str]) -> str:
    """The one line a bad command ends with (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert lines[-1].startswith("error: "), out.err
    return lines[-1]


# ----------------------------------------------------------------------------- run folders
def test_a_run_folder_that_is_a_file_or_lies_under_one_is_named(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("hello")
    line = _error(capsys, [*CALIBRATE, f"--trainer.default_root_dir={afile}"])
    assert line == (
        f"error: cannot use {afile} as the run folder: it is a file, not a folder; "
        "choose another trainer.default_root_dir"
    )
    line = _error(capsys, [*CALIBRATE, f"--trainer.default_root_dir={afile / 'run'}"])
    assert line == (
        f"error: cannot use {afile / 'run'} as the run folder: {afile} is a file, not a folder; "
        "choose another trainer.default_root_dir"
    )
    assert afile.read_text() == "hello"


def test_a_run_folder_that_refuses_writes_is_named(tmp_path, capsys, monkeypatch):
    """What a folder without write permission answers (root ignores permission bits, so the refusal
    is the operating system's answer played back)."""
    import os

    root = tmp_path / "run"
    root.mkdir()
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    line = _error(capsys, [*CALIBRATE, f"--trainer.default_root_dir={root}"])
    assert line == (
        f"error: cannot write in the run folder {root}: Permission denied ({root / '.fimaq.lock'}); "
        "choose another trainer.default_root_dir, or make it writable"
    )


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_an_immutable_run_folder_is_named(tmp_path, capsys):
    root = tmp_path / "frozen"
    root.mkdir()
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("this file system or user cannot make a folder immutable")
    try:
        line = _error(capsys, [*CALIBRATE, f"--trainer.default_root_dir={root}"])
        assert line.startswith(f"error: cannot write in the run folder {root}: Operation not permitted")
        line = _error(capsys, [*CALIBRATE, f"--trainer.default_root_dir={root / 'run'}"])
        assert line.startswith(f"error: cannot use {root / 'run'} as the run folder: Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)


# ----------------------------------------------------------------------------- full disk
def test_a_write_refused_by_the_disk_names_the_file_and_keeps_the_last_good_version(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(b"good"))

    def fill(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FimaqError) as exc:
        atomic_write_bytes(path, fill)
    assert str(exc.value) == f"could not write {path}: No space left on device; its last good version is kept"
    assert path.read_bytes() == b"good" and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(FimaqError, match="; nothing was written$"):
        atomic_write_bytes(tmp_path / "new.bin", fill)
    assert not (tmp_path / "new.bin").exists()


def test_safetensors_reporting_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    path = tmp_path / "calibrated.safetensors"
    save_quantized(path, {"w": torch.ones(2)}, {"arch": "x"})
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(FimaqError) as exc:
        save_quantized(path, {"w": torch.zeros(2)}, {"arch": "x"})
    assert str(exc.value) == f"could not write {path}: No space left on device; its last good version is kept"
    monkeypatch.undo()
    assert torch.equal(read_artifact(path)[0]["w"], torch.ones(2))


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB file system (tmpfs): room for one state of the embedded model, not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_during_calibration_ends_in_one_line_and_keeps_the_state(small_disk):
    root = small_disk / "run"
    done = subprocess.run(cli_cmd("calibrate", root), capture_output=True, text=True, env=ENV, cwd=ROOT)
    state = root / "calib_state.safetensors"
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: could not write {state}: No space left on device; its last good version is kept"
    )
    read_artifact(state)  # the last good state is whole
    assert state_meta(state)["layers_done"] and sorted(p.name for p in root.iterdir()) == [state.name]


# ----------------------------------------------------------------------------- data folders
def _folder(root: Path, train: list[str], val: list[str], per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _validate(data: Path, num_classes: int = 4) -> list[str]:
    return [
        "validate",
        "-c",
        "configs/imagenet/deit_tiny_w3a3.yaml",
        "--data.init_args.root",
        str(data),
        "--model.model_kwargs",
        f"{{img_size: 32, depth: 1, num_classes: {num_classes}}}",
        "--model.checkpoint_path=null",  # (random weights: the data is refused before they matter)
        "--data.init_args.num_workers=0",
        "--data.init_args.calib_size=2",
        "--data.init_args.recon_size=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]


def test_more_classes_than_the_model_has_are_named_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    names = [f"c{i:02d}" for i in range(6)]
    data = _folder(tmp_path / "data", names, names[:2])
    line = _error(capsys, _validate(data, num_classes=4))
    assert line == (
        "error: the data has 6 classes but the model has num_classes=4: class folder(s) beyond the "
        "model's: c04, c05; give the model's num_classes in --model.model_kwargs"
    )


def test_a_val_class_that_train_lacks_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = _folder(tmp_path / "data", ["cat", "dog"], ["cat", "cow"])
    line = _error(capsys, _validate(data))
    assert line == (
        f"error: {data / 'val'} has class folder(s) that {data / 'train'} lacks: cow (val images are "
        "labelled by the names of the train classes)"
    )


def test_val_images_are_labelled_by_the_train_class_names(tmp_path):
    from fimaq.data import ImageNetDataModule

    data = _folder(tmp_path / "data", ["ant", "bee", "cat"], ["ant", "cat"])
    module = ImageNetDataModule(
        str(data),
        arch="deit_tiny_patch16_224",
        model_kwargs={"img_size": 32},
        num_workers=0,
        calib_size=2,
        recon_size=2,
    )
    module.setup()
    labels = torch.cat([y for _, y in module.val_dataloader()])
    assert sorted(labels.tolist()) == [0, 0, 2, 2]  # cat is class 2 of train, not 1 of val


def test_an_empty_class_folder_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = _folder(tmp_path / "data", ["cat", "dog"], ["cat", "dog"])
    (data / "train" / "empty").mkdir()
    (data / "train" / "empty" / "notes.txt").write_text("no images here")
    line = _error(capsys, _validate(data))
    assert line == (
        f"error: class folder(s) under {data / 'train'} hold no images: empty (every class folder needs "
        "at least one image; remove the empty ones)"
    )


# ----------------------------------------------------------------------------- options
def test_more_calibration_images_than_the_data_holds_is_refused_before_any_work(tmp_path, capsys):
    args = [*CALIBRATE, f"--trainer.default_root_dir={tmp_path}", "--validate_fp=true"]
    line = _error(capsys, [*args, "--model.calib.num_images=64"])  # calib_size 16
    assert line == (
        "error: calib.num_images=64 exceeds the data module's 16 calibration images (calib_size): "
        "raise --data.init_args.calib_size or lower --model.calib.num_images"
    )
    assert not (tmp_path / "metrics.json").exists()  # not even the float validation ran


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_a_precision_fimaq_cannot_run_is_refused_before_the_float_validation(tmp_path, capsys, precision):
    args = [
        "fit",
        "-c",
        str(DIGITS),
        *FAST_FIT,
        f"--trainer.default_root_dir={tmp_path}",
        "--validate_fp=true",
    ]
    line = _error(capsys, [*args, f"--trainer.precision={precision}"])
    assert line.startswith(f"error: precision '{precision}' is not supported: use 32-true, bf16-mixed")
    assert not (tmp_path / "metrics.json").exists()


def test_an_infeasible_budget_is_refused_before_any_calibration(monkeypatch):
    from conftest import tiny_model

    import fimaq.mixed_precision.search as search
    from fimaq.config import CalibConfig, MixedPrecisionConfig, QuantSpec

    def never(*args, **kwargs):
        raise AssertionError("calibrated before the budget was checked")

    monkeypatch.setattr(search, "calibrate_model", never)
    with pytest.raises(
        FimaqError, match=r"budget 1 average weight bits cannot be met: the smallest feasible budget is 2"
    ):
        search.search_bit_plan(
            lambda: tiny_model("vit"),
            QuantSpec(w_bits=4, a_bits=4),
            torch.randn(4, 3, 32, 32),
            MixedPrecisionConfig(budget=1.0),
            CalibConfig(num_images=4, eq_n=32),
            "deit_tiny_patch16_224",
            {},
            progress=False,
        )


@pytest.mark.parametrize(
    ("given", "fixed"),
    [
        ("{img_size:64,num_classes:2}", "{img_size: 64, num_classes: 2}"),
    ],
)
def test_a_yaml_mapping_without_spaces_after_its_colons_says_so(capsys, given, fixed):
    line = _error(
        capsys, ["validate", "-c", str(DIGITS), "--trainer.logger=false", "--model.model_kwargs", given]
    )
    assert line.endswith(f"(YAML needs a space after each colon: {fixed})"), line


def test_a_yaml_key_glued_to_its_value_is_refused_not_dropped(capsys):
    """``{depth:2, num_classes: 10}`` is valid YAML: the key ``"depth:2"`` with no value, which timm
    would silently ignore (and build the default depth)."""
    args = ["validate", "-c", str(DIGITS), "--trainer.logger=false"]
    line = _error(
        capsys, [*args, "--model.model_kwargs", "{img_size: 32, patch_size: 4, depth:4, num_classes: 10}"]
    )
    assert line == (
        "error: model_kwargs has the key(s) 'depth:4' without a value: YAML needs a space after each "
        "colon (depth: 4)"
    )


def test_metrics_of_a_refused_run_are_left_as_they_were(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"fp_top1": 1.0}))
    _error(capsys, [*CALIBRATE, f"--trainer.default_root_dir={tmp_path}", "--model.calib.num_images=64"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"fp_top1": 1.0}
