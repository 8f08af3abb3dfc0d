"""The resumable state of a reconstruction: the whole model after every finished unit, with the
settings it was made with and the finished units' reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from fimaq.artifacts import check_state_dict, read_artifact, save_quantized
from fimaq.config import FisherConfig, ReconConfig
from fimaq.errors import FimaqError
from fimaq.layers.mode import set_quant_mode
from fimaq.quant.adaround import AdaRoundQuantizer
from fimaq.quant.rounding import LearnedRounding, attach_rounding
from fimaq.quant.ste_rounding import SteRoundingQuantizer
from fimaq.recon.units import Unit

if TYPE_CHECKING:
    from fimaq.recon.report import ReconReport

STATE_FILE = "recon_state.safetensors"
ROUNDING_QUANTIZERS: dict[str, type[LearnedRounding]] = {
    "adaround": AdaRoundQuantizer,
    "ste": SteRoundingQuantizer,
}
"""The weight quantizer of each ``ReconConfig.rounding``."""


def recon_fingerprint(cfg: ReconConfig, fisher_cfg: FisherConfig, num_images: int) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the state (``compile`` changes
    how fast, and which QDrop draws, not what is optimised)."""
    recon = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SPEED_ONLY}
    return {"recon": recon, "fisher": dataclasses.asdict(fisher_cfg), "images": num_images}


SPEED_ONLY = ("compile", "compile_mode")
"""Reconstruction settings a resumed run may change."""

BEHAVIOUR_BEFORE = {"recon": {"norm_rounding": "soft", "keep_better": False}}
"""Settings whose default differs from what fimaq did before they existed: a state that predates one
ran with the value here, not with today's default."""


def _with_defaults(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A saved fingerprint with the settings it predates filled in (a state written before a setting
    existed ran with its default, or with :data:`BEHAVIOUR_BEFORE`), so that adding a setting does not
    orphan states."""
    out = dict(fingerprint)
    for key, cls in (("recon", ReconConfig), ("fisher", FisherConfig)):
        if isinstance(out.get(key), dict):
            out[key] = {**dataclasses.asdict(cls()), **BEHAVIOUR_BEFORE.get(key, {}), **out[key]}
            for name in SPEED_ONLY:
                out[key].pop(name, None)
    return out


def _read_state(
    path: Path, meta: dict[str, Any], fingerprint: dict[str, Any]
) -> tuple[dict, list[str], dict[str, list[float]], dict[str, float]]:
    state, saved = read_artifact(path)
    expected = {k: v for k, v in {**meta, **fingerprint}.items() if k != "stage"}
    found = {
        k: v for k, v in {**saved, **_with_defaults(saved.get("fingerprint", {}))}.items() if k in expected
    }
    differ = _differences(found, expected)
    if differ:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise FimaqError(
            f"{path} belongs to a run with other settings ({shown}{more}): use another "
            "trainer.default_root_dir (or delete the file to start over)"
        )
    seconds = {k: saved[k] for k in ("seconds", "fisher_seconds") if k in saved}
    return state, list(saved.get("units_done", [])), dict(saved.get("unit_record", {})), seconds


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, wanted value) of every leaf where two nested dicts differ."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(saved) | set(wanted), key=str):
            out += _differences(saved.get(key), wanted.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == wanted else [(prefix.rstrip("."), saved, wanted)]


def write_state(
    path: Path,
    net: nn.Module,
    meta: dict[str, Any],
    fingerprint: dict[str, Any],
    done: list[str],
    report: ReconReport,
) -> None:
    """Write the model (finished units: float weights + hard rounding) and what a resumed run needs."""
    save_quantized(
        path,
        net.state_dict(),
        {
            **meta,
            "stage": "reconstructing",
            "fingerprint": fingerprint,
            "units_done": done,
            "seconds": report.total_seconds,  # the stage's wall time so far, every session's
            "fisher_seconds": report.fisher_seconds,
            "unit_record": {u: _unit_record(report, u) for u in done},
        },
    )


def _unit_record(report: ReconReport, unit: str) -> list[float]:
    """What the reports of a resumed run need of a finished unit: its output errors and seconds, and
    its objective before and after where it was trained."""
    record = [report.error_before[unit], report.error_after[unit], report.unit_seconds[unit]]
    if unit in report.objective_after:
        record += [report.objective_before[unit], report.objective_after[unit]]
        if unit in report.rejected:
            record.append(report.rejected[unit])
    return record


def load_state(
    path: Path,
    net: nn.Module,
    units: list[Unit],
    meta: dict[str, Any],
    fingerprint: dict[str, Any],
    report: ReconReport,
) -> list[str]:
    """Load a state written by :func:`write_state` into ``net`` (refused if made with other settings,
    the rounding method among them); fills the finished units' reports (and the seconds the earlier
    sessions spent) and returns their names."""
    state, done, record, record_seconds = _read_state(path, meta, fingerprint)
    for name in (u for u in done if u in record):  # the finished units' reports, in unit order
        before, after, seconds, *objective = record[name]
        report.error_before[name], report.error_after[name] = before, after
        report.unit_seconds[name] = seconds
        if len(objective) >= 2:
            report.objective_before[name], report.objective_after[name] = objective[:2]
        if len(objective) == 3:
            report.rejected[name] = objective[2]
    report.total_seconds = float(record_seconds.get("seconds", 0.0))
    report.fisher_seconds = float(record_seconds.get("fisher_seconds", 0.0))
    for unit in units:
        if unit.name in done:
            _hard_rounding(unit, fingerprint["recon"]["rounding"])  # float weights + their rounding
    check_state_dict(net.state_dict(), state, f"reconstruction state {path}", "this model")
    net.load_state_dict(state, strict=True)
    # the state is a quantized model (calibrated, some units reconstructed): its quantizers compute, as
    # after calibration or loading an artifact; the driver's mode snapshot then restores this at the end
    set_quant_mode(net, enabled=True)
    report.resumed_units = list(done)
    return done


def _hard_rounding(unit: Unit, rounding: str) -> None:
    for layer in unit.weight_layers():
        learned = attach_rounding(layer, ROUNDING_QUANTIZERS[rounding])
        if learned is not None:
            learned.harden()
