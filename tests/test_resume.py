"""A killed run, resumed, writes what an uninterrupted run writes: the same model, every metric in
metrics.json (the seconds summed over the sessions), and a top-1 that ``validate`` measures again on
the saved file. Real processes, real signals."""

import json
import signal
import socket
from pathlib import Path

import pytest
import torch
from runs import FAST_FIT, cli_cmd, fit_cmd, run, signal_when, state_meta, units_done

from fimaq.artifacts import read_artifact
from fimaq.config import QuantSpec
from fimaq.models.swap import iter_qlayers
from fimaq.module import QuantModel

DIGITS_MODEL = dict(
    arch="deit_tiny_patch16_224",
    checkpoint_path="embedded:digits_deit_tiny",
    model_kwargs={"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10},
    quant=QuantSpec(w_bits=3, a_bits=3),
)
TIMINGS = {"seconds", "calibration_seconds_per_layer", "recon_fisher_seconds", "recon_unit_seconds"}


def _metrics(root: Path) -> dict:
    return json.loads((root / "metrics.json").read_text())


def _assert_same_record(resumed: dict, whole: dict) -> None:
    """Every metric equal to the uninterrupted run's; the timings present for the same stages/units."""
    assert resumed.keys() == whole.keys()
    for key in whole.keys() - TIMINGS:
        assert resumed[key] == whole[key], key
    assert resumed["seconds"].keys() == whole["seconds"].keys()
    if "recon_unit_seconds" in whole:
        assert resumed["recon_unit_seconds"].keys() == whole["recon_unit_seconds"].keys()


def _validated_top1(artifact: Path, root: Path, stage: str = "reconstructed") -> float:
    """The top-1 ``validate`` measures on a saved artifact (of ``stage``), in a folder of its own."""
    run(cli_cmd("validate", root, f"--model.init_from={artifact}"))
    return _metrics(root)[f"{stage}_top1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The quick ``fit`` of the embedded default, run once without interruption (FP accuracy on)."""
    root = tmp_path_factory.mktemp("whole") / "run"
    run(fit_cmd(root, "--validate_fp=true", logger=True))
    return root


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_fit_stopped_in_reconstruction_resumes_to_the_uninterrupted_record(tmp_path, uninterrupted, sig):
    root = tmp_path / "run"
    state = root / "recon_state.safetensors"
    cmd = fit_cmd(root, "--validate_fp=true", logger=True)
    rc = signal_when(cmd, tmp_path / "first.log", lambda: bool(units_done(state)), sig)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 130), (tmp_path / "first.log").read_text()
    killed = state_meta(state)
    done = killed["units_done"]
    assert 1 <= len(done) < 6 and done[0] == "patch_embed"
    assert not (root / "quantized.safetensors").exists()
    # what a kill inside a write would leave behind: never read, removed by the next write
    leftover = root / f".recon_state.safetensors.{socket.gethostname()}.12345678.killed.tmp"
    leftover.write_bytes(b"\x00" * 100)

    log = run(cmd)
    text = log.stdout + log.stderr
    assert f"resuming reconstruction after {len(done)} finished units" in text
    assert sorted(root.glob(".*.tmp")) == []

    resumed, whole = _metrics(root), _metrics(uninterrupted)
    _assert_same_record(resumed, whole)
    assert len(whole["recon_output_mse"]) == 6
    # the reconstruction's seconds sum over both sessions: the first one's, as its last state recorded
    # them, and the resumed units'
    later = sum(s for u, s in resumed["recon_unit_seconds"].items() if u not in done)
    assert resumed["seconds"]["reconstruct"] >= killed["seconds"] + later
    assert killed["seconds"] >= sum(resumed["recon_unit_seconds"][u] for u in done)
    assert resumed["recon_fisher_seconds"] >= killed["fisher_seconds"]

    a, meta = read_artifact(root / "quantized.safetensors")
    b, _ = read_artifact(uninterrupted / "quantized.safetensors")
    assert meta["stage"] == "reconstructed" and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the reported top-1 is the saved model's
    assert (
        _validated_top1(root / "quantized.safetensors", tmp_path / "check") == resumed["reconstructed_top1"]
    )

    # the resumed run logged on into the interrupted run's TensorBoard version, with the same tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in root.glob("version_*")] == ["version_0"]
    tags = []
    for folder in (root, uninterrupted):
        events = EventAccumulator(str(folder / "version_0"))
        events.Reload()
        tags.append({t for t in events.Tags()["scalars"] if t.startswith("recon/")})
    assert tags[0] == tags[1] and any(t.startswith("recon/patch_embed") for t in tags[0])
    assert "search_rounds: 0" in (root / "version_0" / "hparams.yaml").read_text()


def test_a_killed_calibration_resumes_to_the_uninterrupted_record(tmp_path):
    slower = [*FAST_FIT, "--model.calib.search_rounds=1"]
    whole = tmp_path / "whole"
    run(cli_cmd("calibrate", whole, fast=slower))
    root = tmp_path / "run"
    state = root / "calib_state.safetensors"
    cmd = cli_cmd("calibrate", root, fast=slower)
    signal_when(
        cmd, tmp_path / "first.log", lambda: bool(state_meta(state).get("layers_done")), signal.SIGKILL
    )
    killed = state_meta(state)
    assert 1 <= len(killed["layers_done"]) and not (root / "calibrated.safetensors").exists()

    log = run(cmd)
    assert (
        f"resuming calibration after {len(killed['layers_done'])} calibrated layers"
        in log.stdout + log.stderr
    )
    resumed, reference = _metrics(root), _metrics(whole)
    _assert_same_record(resumed, reference)
    # seconds over both sessions; per layer, over every layer (those of the first session too)
    assert resumed["seconds"]["calibrate"] >= killed["seconds"]
    layers = len(list(iter_qlayers(QuantModel(**DIGITS_MODEL).net)))
    per_layer = resumed["calibration_seconds_per_layer"]
    assert abs(per_layer * layers - resumed["seconds"]["calibrate"]) <= 1e-4 * layers + 1e-3
    a, _ = read_artifact(root / "calibrated.safetensors")
    b, _ = read_artifact(whole / "calibrated.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert not state.exists()
    validated = _validated_top1(root / "calibrated.safetensors", tmp_path / "check", "calibrated")
    assert validated == resumed["calibrated_top1"]


def test_fit_from_a_calibrated_artifact_reports_no_float_accuracy_it_did_not_measure(tmp_path, uninterrupted):
    root = tmp_path / "run"
    log = run(fit_cmd(root, f"--model.init_from={uninterrupted / 'calibrated.safetensors'}"))
    text = log.stdout + log.stderr
    assert "nan" not in text.lower()
    last = [ln for ln in text.splitlines() if ln.startswith("top-1:")][-1]
    assert last.startswith("top-1: calibrated ") and "FP" not in last
    assert _metrics(root)["reconstructed_top1"] == _metrics(uninterrupted)["reconstructed_top1"]
