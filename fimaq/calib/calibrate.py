"""calibrate_model: the calibration stage, one FP capture pass per unit, then each layer's search;
resumable after its last calibrated layer (``CALIB_STATE_FILE``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fimaq.amp import autocast, check_precision
from fimaq.artifacts import check_state_dict, read_artifact, save_quantized
from fimaq.calib.capture import capture_io, run_batches
from fimaq.calib.layers import calibrate_conv, calibrate_linear, calibrate_matmul
from fimaq.config import CalibConfig
from fimaq.errors import FimaqError, Interrupted, defer_interrupts
from fimaq.layers import QuantConv2d, QuantLinear, QuantMatMul
from fimaq.layers.mode import quant_mode, set_quant_mode
from fimaq.models.swap import iter_qlayers
from fimaq.parallel import Ranks
from fimaq.quant import search

log = logging.getLogger(__name__)

CALIB_STATE_FILE = "calib_state.safetensors"


@dataclass
class CalibReport:
    """Wall time of the stage: capture passes and per-layer searches, in seconds (a resumed run's
    include the interrupted sessions' work up to their last saved state)."""

    layer_seconds: dict[str, float] = field(default_factory=dict)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def seconds_per_layer(self) -> float:
        return self.total_seconds / max(1, len(self.layer_seconds))


@contextmanager
def float32_products() -> Iterator[None]:
    """Full float32 matrix products (no TF32 on GPUs) for the searches' fast passes, whose stated
    tolerance assumes float32 rounding; the previous setting is restored on exit."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _load_state(
    model: nn.Module, path: Path, fingerprint: dict[str, Any], ranks: Ranks, report: CalibReport
) -> list[str]:
    """Load a calibration state written by an interrupted run; returns its calibrated layers and puts
    their seconds (and the stage's wall time until the state was written) into ``report``."""
    if not path.is_file():
        return []
    state, saved = read_artifact(path)
    for key in ("arch", "model_kwargs", "quant", "calib", "images"):
        value = fingerprint.get(key)
        if saved.get(key) != value:
            raise FimaqError(
                f"{path} belongs to a calibration with {key}={saved.get(key)!r}, not {value!r}: use another "
                "trainer.default_root_dir (or delete the file to start over)"
            )
    check_state_dict(model.state_dict(), state, f"calibration state {path}", "this model")
    model.load_state_dict(state, strict=True)
    done = list(saved.get("layers_done", []))
    report.layer_seconds.update({k: float(v) for k, v in saved.get("layer_seconds", {}).items()})
    report.total_seconds = float(saved.get("seconds", 0.0))
    report.capture_seconds = float(saved.get("capture_seconds", 0.0))
    ranks.info(log, "resuming calibration after %d calibrated layers (%s)", len(done), path)
    return done


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _folds(layer, cfg: CalibConfig) -> bool:
    return layer.norm is not None and cfg.fold_layernorm and layer.module.a_quantizer.bits is not None


@torch.no_grad()
def calibrate_layer(layer, captured, cfg: CalibConfig, num_images: int) -> None:
    """Dispatch one layer's search on its captured FP input(s) and output."""
    mod = layer.module
    if isinstance(mod, QuantConv2d):
        calibrate_conv(mod, captured.inputs[0], captured.output, cfg)
    elif isinstance(mod, QuantLinear):
        x, y = _flat(captured.inputs[0]), _flat(captured.output)
        calibrate_linear(mod, layer.norm, x, y, cfg, num_images, layer.co_readers)
    elif isinstance(mod, QuantMatMul):
        a, b = captured.inputs
        calibrate_matmul(mod, a, b, captured.output, cfg)


def calibrate_model(
    model: nn.Module,
    images: torch.Tensor,
    cfg: CalibConfig | None = None,
    progress: bool = True,
    units: Sequence[str] | None = None,
    precision: str = "32-true",
    tie_log: list | None = None,
    state_path: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    ranks: Ranks | None = None,
) -> CalibReport:
    """Search the qparams of every quantized layer of ``model`` (built by ``quantize_model``).

    Each unit (patch embedding, block, patch merging, head) is captured with the whole model in FP
    and its layers are searched on those tensors in model order. A LayerNorm fold changes the float
    weights but not the float function; by default the unit's remaining layers are captured once more
    after it (``recapture_after_fold``), so they see the same float rounding as in the reference.
    Quantizers are enabled at the end.

    Args:
        model: a quantized model (``fimaq.models.swap.quantize_model``).
        images: calibration images ``(n, C, H, W)``, used as given (already transformed). Data
            parallel: this rank's contiguous shard (ranks in order, at most ``num_images`` in all);
            each rank runs its shard through the model and the captured layer inputs and outputs are
            gathered, so every rank searches the same tensors as one process and ends with the same
            qparams.
        cfg: search settings.
        progress: show a progress bar.
        units: calibrate only these units (names as in ``QLayer.unit``); all by default.
        precision: Lightning precision of the capture passes (``bf16-mixed``: autocast; the captured
            tensors and the searches stay float32).
        tie_log: a list that receives every group settled by the tie rule, labelled with the layer
            and quantizer (:func:`fimaq.quant.search.tie_log`).
        state_path: a resumable state (safetensors): written after every unit (and after a layer
            once a minute has passed since the last write); when it exists, the run loads it and
            continues after its last calibrated layer, with the result of an uninterrupted run.
        meta: what the state records of the model (arch, kwargs, bits); a state of another model or
            other calibration settings is refused.
        ranks: the processes of a data-parallel run (default: one process).
    """
    cfg = (cfg or CalibConfig()).validate()
    check_precision(precision)
    if images.ndim != 4 or images.shape[0] < 1:
        raise FimaqError(f"calibration images must be a (n, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise FimaqError("calibration images contain NaN or Inf")
    ranks = ranks or Ranks()
    if ranks.world == 1:
        images = images[: cfg.num_images]
    num_images = ranks.shard_offsets(images.shape[0], images.device)[0]
    layers = list(iter_qlayers(model))
    if not layers:
        raise FimaqError("model has no quantized layers: call quantize_model first")
    all_units = list(dict.fromkeys(q.unit for q in layers))
    unknown = set(units or ()) - set(all_units)
    if unknown:
        raise FimaqError(f"unknown units {sorted(unknown)}; the model has {all_units}")
    units = [u for u in all_units if units is None or u in units]
    layers = [q for q in layers if q.unit in units]
    report = CalibReport()
    state_path = Path(state_path) if state_path is not None else None
    fingerprint = {
        **(meta or {}),
        "calib": dataclasses.asdict(cfg),
        "images": num_images,
        "stage": "calibrating",
    }
    done = _load_state(model, state_path, fingerprint, ranks, report) if state_path is not None else []
    before = report.total_seconds  # the sessions before this one (a resumed run), until their last state
    if state_path is not None:
        ranks.barrier()  # every rank has read the state before rank 0 writes it again
    layers = [q for q in layers if q.name not in done]
    last_save = time.perf_counter()

    def save(force: bool) -> None:
        nonlocal last_save
        if state_path is None or not ranks.is_main or not (force or time.perf_counter() - last_save > 60):
            return
        seconds = {
            "seconds": before + time.perf_counter() - start,
            "capture_seconds": report.capture_seconds,
            "layer_seconds": report.layer_seconds,
        }
        save_quantized(state_path, model.state_dict(), {**fingerprint, "layers_done": done, **seconds})
        last_save = time.perf_counter()

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(layers), desc="calibrate", disable=not progress, leave=False)
    searching = ""  # the layer whose search runs
    try:
        with bar, quant_mode(model, enabled=False, explicit_matmuls=True):  # the bar closes on an error too
            for unit in units:
                pending = [q for q in layers if q.unit == unit]
                while pending:
                    t0 = time.perf_counter()
                    with capture_io({q.name: q.module for q in pending}) as store:
                        with autocast(precision, images.device):
                            run_batches(model, images, cfg.batch_size)
                    if ranks.world > 1:
                        for captured in store.values():
                            captured.inputs = [ranks.gather_rows(t) for t in captured.inputs]
                            captured.output = ranks.gather_rows(captured.output)
                    report.capture_seconds += time.perf_counter() - t0
                    while pending:
                        layer = pending.pop(0)
                        bar.set_postfix_str(layer.name)
                        t1 = time.perf_counter()
                        logged = nullcontext() if tie_log is None else search.tie_log(tie_log, layer.name)
                        searching = layer.name
                        with logged, float32_products():
                            calibrate_layer(layer, store[layer.name], cfg, num_images)
                        with defer_interrupts():  # a layer counts as calibrated once recorded (and saved)
                            report.layer_seconds[layer.name] = time.perf_counter() - t1
                            done.append(layer.name)
                            save(force=not any(q.unit == unit for q in pending))
                        bar.update()
                        if _folds(layer, cfg) and (cfg.recapture_after_fold or layer.co_readers):
                            break  # later layers see the folded LayerNorm's output, as in the reference
                    del store
    except Interrupted as exc:
        at = f"at layer {searching} " if searching and searching not in done else ""  # (else: a capture)
        exc.where = exc.where or f"during calibration, {at}after {len(done)} calibrated layers"
        raise
    set_quant_mode(model, enabled=True)  # the calibrated model computes quantized
    model.train(was_training)
    report.total_seconds = before + time.perf_counter() - start
    return report
