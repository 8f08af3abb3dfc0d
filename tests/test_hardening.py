"""Hardening: atomic writes, a killed ``fit`` resumes, and every file fimaq reads is validated.

Bad input (checkpoint, artifact, bit plan) must end in one clear FimaqError line, exit status 2 from
the CLI, and never unpickle anything.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import DIGITS, FAST_FIT, fit_cmd, signal_when, units_done

from fimaq.artifacts import check_state_dict, read_artifact, save_quantized
from fimaq.cli import main
from fimaq.errors import FimaqError
from fimaq.files import atomic_write_bytes, remove_stale_temps
from fimaq.mixed_precision.plan import BitPlan
from fimaq.models import create_fp_model
from fimaq.run_dir import check_run_dir, update_metrics

TINY_ARCH = "deit_tiny_patch16_224"
TINY_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_fp_model(TINY_ARCH, model_kwargs=TINY_KWARGS).state_dict()


# ----------------------------------------------------------------------------- atomic writes
def test_a_write_that_dies_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text('{"old": 1}'))

    def dies_midway(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write('{"new": ')
            handle.flush()
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, dies_midway)
    assert json.loads(path.read_text()) == {"old": 1}
    assert _temps(tmp_path) == []

    # the same for an artifact: the last good state stays loadable
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_quantized(tmp_path / "a.safetensors", state, {"arch": "x", "units_done": ["u0"]})
    import safetensors.torch

    def half_then_fail(tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a torn header
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(FimaqError, match="a.safetensors: OSError: disk full; its last good version is kept"):
        save_quantized(tmp_path / "a.safetensors", {"w": torch.zeros(9)}, {"arch": "x"})
    monkeypatch.undo()
    loaded, meta = read_artifact(tmp_path / "a.safetensors")
    assert torch.equal(loaded["w"], state["w"]) and meta["units_done"] == ["u0"]
    assert _temps(tmp_path) == []


def test_written_files_get_normal_permissions_and_stale_temps_are_removed(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = tmp_path / "metrics.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    stale = tmp_path / f".metrics.json.{host}.{dead_pid}.abc123.tmp"
    live = tmp_path / f".metrics.json.{host}.1.def456.tmp"  # pid 1 runs: its writer may still be busy
    other = tmp_path / f".metrics.json.another-host.{dead_pid}.ghi789.tmp"
    for p in (stale, live, other):
        p.write_text("partial")
    update_metrics(tmp_path, {"a": 1.0})
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temps(path) == []


# ----------------------------------------------------------------------------- interruptions
def _last_line(text: str) -> str:
    """What a terminal shows last: the last line, after its last carriage return (a progress bar
    redrawn after a message would be that line)."""
    return text.rstrip("\n").split("\n")[-1].split("\r")[-1]


def test_interrupts_say_what_stopped_and_never_exit_zero(tmp_path):
    bars = "--trainer.enable_progress_bar=true"  # the line must come after the bars, not before them
    root = tmp_path / "run"
    state = root / "recon_state.safetensors"
    log = tmp_path / "term.log"
    # SIGTERM while a unit trains: 143, one line naming the unit, the finished units kept
    slow = ["--model.recon.iters=400", bars]
    rc = signal_when(fit_cmd(root, *slow), log, lambda: bool(units_done(state)), signal.SIGTERM)
    last = _last_line(log.read_text())
    done = units_done(state)
    assert rc == 143, log.read_text()
    assert re.fullmatch(
        rf"interrupted in unit \S+ after {len(done)} finished units; run the same command again to resume",
        last,
    ), last
    assert "Traceback" not in log.read_text() and _temps(root) == []
    # Ctrl-C during calibration: 130, the layer named
    other = tmp_path / "calib"
    log = tmp_path / "int.log"
    cmd = fit_cmd(other, "--model.calib.search_rounds=3", "--model.calib.eq_n=128", bars)
    rc = signal_when(cmd, log, lambda: "digits:" in log.read_text(), signal.SIGINT)
    last = _last_line(log.read_text())
    assert rc == 130, log.read_text()
    assert re.fullmatch(
        r"interrupted during calibration, (at layer \S+ )?after \d+ calibrated layers; run the same command "
        r"again to resume",
        last,
    ), last


def test_an_interruption_waits_for_the_bookkeeping_to_finish():
    """A signal inside a deferred block (recording a finished unit and writing its state) is raised
    when the block has finished; outside one it is raised at once."""
    from fimaq.errors import Interrupted, defer_interrupts, raise_interrupted

    steps = []
    with pytest.raises(Interrupted) as exc:
        with defer_interrupts():
            raise_interrupted(signal.SIGTERM)  # what the handler does when the signal arrives
            steps.append("state written")
    assert steps == ["state written"] and exc.value.signum == signal.SIGTERM
    with pytest.raises(Interrupted):
        raise_interrupted(signal.SIGINT)


# ----------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this would create a folder: weights-only loading must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_checkpoint(tmp_path: Path, case: str) -> Path:
    from safetensors.torch import save_file

    state = _tiny_state()
    if case == "truncated.safetensors":
        save_file(state, str(tmp_path / "full.safetensors"))
        data = (tmp_path / "full.safetensors").read_bytes()
        (tmp_path / case).write_bytes(data[: len(data) // 2])
    elif case == "truncated.pth":
        torch.save(state, tmp_path / "full.pth")
        data = (tmp_path / "full.pth").read_bytes()
        (tmp_path / case).write_bytes(data[: len(data) // 2])
    elif case == "code.pth":
        torch.save({"state_dict": state, "hook": _Payload(str(tmp_path / "pwned"))}, tmp_path / case)
    elif case == "junk.bin":
        (tmp_path / case).write_bytes(b"hello world, not a checkpoint")
    elif case == "list.pt":
        torch.save([torch.zeros(2)], tmp_path / case)
    elif case == "nan.safetensors":
        state["blocks.1.mlp.fc1.bias"][3] = float("nan")
        save_file(state, str(tmp_path / case))
    elif case == "other_model.pth":
        torch.manual_seed(0)
        other = create_fp_model(TINY_ARCH, model_kwargs={**TINY_KWARGS, "embed_dim": 96, "depth": 3})
        torch.save(other.state_dict(), tmp_path / case)
    return tmp_path / case


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated.safetensors", "is truncated or not a safetensors file"),
        ("truncated.pth", "is truncated or"),
        (
            "code.pth",
            r"holds other pickled objects \(refused global posix.mkdir\), and fimaq never unpickles code",
        ),
        ("junk.bin", r"is not a PyTorch or safetensors file \(it starts with b'hello world,'\)"),
        ("list.pt", "does not hold a state dict of tensors"),
        ("nan.safetensors", "holds NaN or Inf values in 'blocks.1.mlp.fc1.bias'"),
        (
            "other_model.pth",
            r"shape mismatch\(es\) \(file vs model\): cls_token \(1, 1, 96\) vs \(1, 1, 48\)",
        ),
    ],
)
def test_bad_checkpoints_are_named(tmp_path, case, message):
    path = _write_checkpoint(tmp_path, case)
    with pytest.raises(FimaqError, match=message) as exc:
        create_fp_model(TINY_ARCH, str(path), model_kwargs=TINY_KWARGS)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_another_depth_names_the_keys(tmp_path):
    from safetensors.torch import save_file

    state = _tiny_state()
    save_file(
        {k: v for k, v in state.items() if not k.startswith("blocks.1.")}, str(tmp_path / "d1.safetensors")
    )
    with pytest.raises(FimaqError, match=r"missing key\(s\): blocks.1.norm1.weight, blocks.1.norm1.bias, "):
        create_fp_model(TINY_ARCH, str(tmp_path / "d1.safetensors"), model_kwargs=TINY_KWARGS)
    save_file(state, str(tmp_path / "d2.safetensors"))
    with pytest.raises(FimaqError, match=r"12 unexpected key\(s\): (blocks\.1\.\S+, ){3}\.\.\.$"):
        create_fp_model(TINY_ARCH, str(tmp_path / "d2.safetensors"), model_kwargs={**TINY_KWARGS, "depth": 1})


# ----------------------------------------------------------------------------- artifacts
def test_bad_artifacts_are_named(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.ones(4, 3), "steps": torch.arange(3)}
    good = tmp_path / "good.safetensors"
    save_quantized(good, state, {"arch": TINY_ARCH, "stage": "calibrated"})
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 7])
    cases = {
        cut: "is truncated or not a safetensors file",
        tmp_path / "empty.safetensors": "is truncated or not a safetensors file",
        tmp_path / "v99.safetensors": "has schema version 99, this fimaq reads version 1",
        tmp_path / "json.safetensors": "has corrupt fimaq metadata",
        tmp_path / "plain.safetensors": "is not a fimaq artifact",
        tmp_path / "nan.safetensors": "holds NaN or Inf values in 'w'",
    }
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file(state, str(tmp_path / "v99.safetensors"), metadata={"fimaq": '{"schema_version": 99}'})
    save_file(state, str(tmp_path / "json.safetensors"), metadata={"fimaq": '{"schema_version": 1'})
    save_file(state, str(tmp_path / "plain.safetensors"))
    save_quantized(tmp_path / "nan.safetensors", {"w": torch.full((2,), float("inf"))}, {})
    for path, message in cases.items():
        with pytest.raises(FimaqError, match=message) as exc:
            read_artifact(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)

    # a run folder with a damaged artifact says which file and what to do
    run = tmp_path / "run"
    run.mkdir()
    (run / "recon_state.safetensors").write_bytes(data[:20])
    with pytest.raises(FimaqError, match="recon_state.safetensors is truncated.*delete it or choose another"):
        check_run_dir(run, {"arch": TINY_ARCH})


def test_wrong_shapes_name_the_first_keys():
    own = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2), "c": torch.zeros(1)}
    state = {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(2), "d": torch.zeros(1)}
    with pytest.raises(FimaqError) as exc:
        check_state_dict(own, state, "artifact x.safetensors", "this model")
    text = str(exc.value)
    assert text.startswith("artifact x.safetensors does not fit this model: ")
    assert "1 shape mismatch(es) (file vs model): a.weight (3, 4) vs (4, 3)" in text
    assert "1 missing key(s): c" in text and "1 unexpected key(s): d" in text


def test_an_artifact_with_wrong_shapes_is_refused_by_name(tmp_path):
    from fimaq.config import QuantSpec
    from fimaq.module import QuantModel

    model = QuantModel(TINY_ARCH, model_kwargs=TINY_KWARGS, quant=QuantSpec(4, 4))
    state = model.net.state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 48)
    save_quantized(tmp_path / "bad.safetensors", state, {**model.artifact_meta(), "stage": "calibrated"})
    with pytest.raises(FimaqError, match=r"blocks.0.mlp.fc1.weight \(7, 48\) vs \(192, 48\)"):
        QuantModel(
            TINY_ARCH,
            model_kwargs=TINY_KWARGS,
            quant=QuantSpec(4, 4),
            init_from=str(tmp_path / "bad.safetensors"),
        )


def test_corrupt_metrics_are_kept_aside_not_crashed_on(tmp_path):
    (tmp_path / "metrics.json").write_text('["not", "an", "object"]')
    data = update_metrics(tmp_path, {"fp_top1": 90.0}, {"calibrate": 1.0})
    assert data == {"fp_top1": 90.0, "seconds": {"calibrate": 1.0}}
    assert (tmp_path / "metrics.json.corrupt").read_text() == '["not", "an", "object"]'
    assert json.loads((tmp_path / "metrics.json").read_text()) == data


# ----------------------------------------------------------------------------- bit plans
def _plan() -> BitPlan:
    return BitPlan(
        arch=TINY_ARCH,
        model_kwargs=dict(TINY_KWARGS),
        budget=3.0,
        layers={
            "blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 3},
            "blocks.0.mlp.fc1": {"w_bits": 2, "a_bits": 3},
            "blocks.1.mlp.fc2": {"w_bits": 3, "a_bits": 3},
        },
        sensitivity={"blocks.0.attn.qkv": 1.5, "blocks.0.mlp.fc1": 0.5, "blocks.1.mlp.fc2": 0.7},
        average_w_bits=2.9,
        rounds=[{"blocks.0.attn.qkv": 4, "blocks.0.mlp.fc1": 2, "blocks.1.mlp.fc2": 3}],
    )


def test_bad_bit_plans_are_named(tmp_path):
    text = _plan().save(tmp_path / "plan.yaml").read_text()
    cases = {
        "malformed.yaml": (
            "fimaq_bit_plan: 1\nlayers: {a: [1,\n",
            r"is not valid YAML: .*\(line \d+, column",
        ),
        "truncated.yaml": (
            text[: text.index("blocks.0.mlp.fc1")],
            "incomplete bit plan .truncated.*sensitivity",
        ),
        "cut_line.yaml": (text[: text.index("blocks.1.mlp.fc2") + 20], "incomplete bit plan"),
        "layer_not_map.yaml": (
            text.replace("  blocks.0.mlp.fc1:\n", "  blocks.0.mlp.fc1: 3\n  x:\n"),
            "must be a mapping",
        ),
        "budget.yaml": (text.replace("budget: 3.0", "budget: lots"), "budget must be a finite number"),
        "extra.yaml": (text + "colour: red\n", "unknown bit plan field.*colour"),
        "binary.yaml": (None, "cannot read bit plan"),
        "empty.yaml": ("", "is not a fimaq bit plan"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes(b"\xff\xfe\x00binary")
        else:
            path.write_text(content)
        with pytest.raises(FimaqError, match=message) as exc:
            BitPlan.load(path)
        assert "\n" not in str(exc.value), name


def test_a_plan_naming_unknown_layers_is_refused(tiny_vit):
    from fimaq.config import QuantSpec
    from fimaq.models.swap import iter_qlayers, quantize_model

    plan = _plan()
    names = [q.name for q in iter_qlayers(quantize_model(tiny_vit, QuantSpec(4, 4)))]
    plan.check_layers(names)
    plan.layers["blocks.7.mlp.fc1"] = {"w_bits": 4}
    with pytest.raises(
        FimaqError, match="names 1 layer.s. this deit_tiny_patch16_224 does not have: blocks.7"
    ):
        plan.check_layers(names, "plan.yaml")


# ----------------------------------------------------------------------------- through the CLI
def _cli_error(capsys, *extra: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["validate", "-c", str(DIGITS), "--trainer.logger=false", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_bad_files_through_the_cli_give_one_error_line(tmp_path, capsys):
    torch.save({"model": _Payload(str(tmp_path / "pwned"))}, tmp_path / "code.pth")
    line = _cli_error(capsys, f"--model.checkpoint_path={tmp_path / 'code.pth'}")
    assert "never unpickles code" in line and not (tmp_path / "pwned").exists()

    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    line = _cli_error(capsys, f"--model.checkpoint_path={tmp_path / 'cut.safetensors'}")
    assert "cut.safetensors is truncated or not a safetensors file" in line

    save_quantized(tmp_path / "nan.safetensors", {"w": torch.tensor([float("nan")])}, {"arch": "x"})
    line = _cli_error(capsys, f"--model.init_from={tmp_path / 'nan.safetensors'}")
    assert "holds NaN or Inf values in 'w'" in line

    (tmp_path / "plan.yaml").write_text("fimaq_bit_plan: 1\nlayers: {a: [1,\n")
    line = _cli_error(capsys, f"--model.bit_plan={tmp_path / 'plan.yaml'}")
    assert "plan.yaml is not valid YAML" in line


def test_a_run_folder_has_one_owner(tmp_path, capsys, caplog):
    import logging

    from fimaq.run_dir import LOCK_NAME

    root = tmp_path / "run"
    root.mkdir()
    lock = root / LOCK_NAME
    args = ["calibrate", "-c", str(DIGITS), f"--trainer.default_root_dir={root}", *FAST_FIT[:-1]]
    # a live owner: the second run is refused with one line naming it, and the lock stays
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (
            f"error: {root} is in use by another fimaq run (pid {owner.pid} on {socket.gethostname()}); "
            f"wait for it to finish or choose another trainer.default_root_dir (if that run is gone, "
            f"delete {lock})"
        )
        assert lock.is_file() and not (root / "calibrated.safetensors").exists()
    finally:
        owner.kill()
        owner.wait()
    # its owner is dead now: the next run takes the folder over with a warning, and releases it
    caplog.set_level(logging.WARNING)
    main(args)
    assert "taking over the lock of a run that is no longer alive" in caplog.text
    assert (root / "calibrated.safetensors").is_file() and not lock.exists()
