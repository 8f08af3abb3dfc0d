"""Pipeline: fimaq's stages on one model and one run folder, from Python or from the command line.

Example (the README's "From Python")::

    from fimaq import DigitsDataModule, Pipeline, QuantModel, QuantSpec
    import lightning as L

    kwargs = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}
    model = QuantModel("deit_tiny_patch16_224", "embedded:digits_deit_tiny", model_kwargs=kwargs,
                       quant=QuantSpec(w_bits=4, a_bits=4))
    trainer = L.Trainer(default_root_dir="runs/w4a4", accelerator="cpu", logger=False)
    metrics = Pipeline(model, trainer).fit(DigitsDataModule(model_kwargs=kwargs))

Every stage writes ``<default_root_dir>/metrics.json`` (accuracies in percent, wall seconds per
stage). ``calibrate`` also writes ``calibrated.safetensors``; ``fit`` writes ``recon_state.safetensors``
(after every unit, for resuming), ``quantized.safetensors`` and ``recon_errors.png``; ``search_bits``
writes ``bit_plan.yaml``/``.png``; ``export`` writes ``export.safetensors`` and ``model.onnx``. With
``--data.synthetic true`` the images come from the float model and are kept in ``synthetic.safetensors``
(docs/synthetic.md).
With a Trainer of ``strategy="ddp", devices=N`` every stage runs on N processes (Lightning launches
them; each runs the same script): each holds a shard of the images, and only rank 0 writes files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from fimaq.amp import autocast
from fimaq.artifacts import save_quantized
from fimaq.calib import CALIB_STATE_FILE
from fimaq.config import MixedPrecisionConfig
from fimaq.data import PTQDataModule
from fimaq.data.synthetic import SYNTHETIC_FILE, weights_fingerprint
from fimaq.errors import FimaqError, require_int
from fimaq.mixed_precision.plan import BitPlan
from fimaq.module import QuantModel
from fimaq.parallel import Ranks
from fimaq.recon import STATE_FILE
from fimaq.run_dir import check_run_dir, run_lock, update_metrics


def where() -> str:
    """What the timings ran on: the CPU capability and thread count (and the GPU when there is one)."""
    text = f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    return text + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def _accuracies(metrics: dict[str, Any], stages: tuple[str, ...]) -> str:
    """``FP 98.89%  calibrated 95.11%  ...`` for the stages whose top-1 ``metrics`` holds (a run from
    ``--model.init_from``, or with ``validate_fp`` off, has no float accuracy)."""
    names = {"fp": "FP"}
    found = [(s, metrics[f"{s}_top1"]) for s in stages if isinstance(metrics.get(f"{s}_top1"), (int, float))]
    return "  ".join(f"{names.get(s, s)} {v:.2f}%" for s, v in found)


class Pipeline:
    """The stages of post-training quantization for ``model``, run with ``trainer``'s settings.

    The Trainer gives the run folder (``default_root_dir``), loggers, progress bar, precision and
    hardware (accelerator, strategy, devices); the per-unit reconstruction Trainers inherit them.

    Args:
        model: the model to quantize (or, with ``init_from``, the quantized model to go on with).
        trainer: a Lightning Trainer (default: one that logs nowhere, in the current folder).
        validate_fp: ``calibrate``/``fit`` also measure the float model's accuracy first.
    """

    def __init__(self, model: QuantModel, trainer: L.Trainer | None = None, validate_fp: bool = True) -> None:
        self.model = model
        self.trainer = trainer or L.Trainer(
            logger=False, enable_checkpointing=False, enable_model_summary=False
        )
        self.validate_fp = validate_fp
        self._ranks: Ranks | None = None
        self._owning = False

    @property
    def root(self) -> Path:
        return Path(self.trainer.default_root_dir)

    @property
    def ranks(self) -> Ranks:
        """The run's processes (a data-parallel Trainer's are launched on first use)."""
        if self._ranks is None:
            self._ranks = Ranks.of_trainer(self.trainer)
            if self._ranks.world > 1:
                rank_zero_info(f"data parallel: {self._ranks.world} processes ({self._ranks.backend})")
        return self._ranks

    @contextmanager
    def _stage(self, datamodule: Any) -> Iterator[Path]:
        """Start the ranks and hold the run folder's lock (rank 0; nested stages share it)."""
        if not isinstance(datamodule, PTQDataModule):
            raise FimaqError(
                f"{type(datamodule).__name__} is not a fimaq.data.PTQDataModule: the stages need its "
                "calibration and reconstruction tensors"
            )
        if self._owning:
            yield self.root
            return
        datamodule.check_model(self.model.net.num_classes)
        ranks = self.ranks
        with run_lock(self.root, enabled=ranks.is_main):
            self._owning = True
            try:
                yield self.root
            finally:
                self._owning = False

    @property
    def _bars(self) -> bool:
        return self.ranks.is_main and self.trainer.progress_bar_callback is not None

    def _top1(self, datamodule: PTQDataModule) -> dict[str, float]:
        start = time.perf_counter()
        result = self.trainer.validate(self.model, datamodule=datamodule, verbose=False)[0]
        return {
            "top1": round(float(result["val/top1"]), 4),
            "top5": round(float(result["val/top5"]), 4),
            "seconds": time.perf_counter() - start,
        }

    def _write_metrics(self, values: dict[str, Any], seconds: dict[str, float] | None = None) -> dict:
        if not self.ranks.is_main:
            return values
        return update_metrics(self.root, values, seconds)

    def _log(self, values: dict[str, Any], prefix: str) -> None:
        if self.ranks.is_main:
            for logger in self.trainer.loggers:
                logger.log_metrics({f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, float)})

    # ------------------------------------------------------------------ stages
    def validate(self, datamodule: PTQDataModule, verbose: bool = True) -> dict[str, float]:
        """Top-1/top-5 (percent) of the model as it is (float, calibrated or reconstructed); written to
        metrics.json as ``<stage>_top1``/``_top5``."""
        with self._stage(datamodule):
            res = self._top1(datamodule)
            key = self.model.stage
            self._write_metrics(
                {f"{key}_top1": res["top1"], f"{key}_top5": res["top5"]}, {f"validate_{key}": res["seconds"]}
            )
            if verbose:
                written = self.root / "metrics.json"
                rank_zero_info(f"{key} top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%; wrote {written}")
            return {"val/top1": res["top1"], "val/top5": res["top5"]}

    def calibrate(self, datamodule: PTQDataModule) -> dict[str, Any]:
        """Calibrate the quantizer scales (resumable), save calibrated.safetensors, validate."""
        model = self.model
        with self._stage(datamodule) as root:
            if model.quantized:
                raise FimaqError("the model is already quantized (--model.init_from): nothing to calibrate")
            check_run_dir(root, model.artifact_meta())
            self._check_calibration(datamodule)
            values: dict[str, Any] = {}
            seconds: dict[str, float] = {}
            if self.validate_fp:
                fp = self._top1(datamodule)
                values.update(fp_top1=fp["top1"], fp_top5=fp["top5"])
                seconds["validate_fp"] = fp["seconds"]
                rank_zero_info(f"FP top-1 {fp['top1']:.2f}%")
            datamodule.setup("fit")
            seconds.update(self._use_synthetic(datamodule))
            images, _ = datamodule.calibration_tensors()
            model.to(self.trainer.strategy.root_device)
            report = model.calibrate(
                images,
                progress=self._bars,
                precision=self.trainer.precision,
                state_dir=root,
                ranks=self.ranks,
            )
            seconds["calibrate"] = report.total_seconds
            values["calibration_seconds_per_layer"] = round(report.seconds_per_layer, 4)
            if self.ranks.is_main:
                save_quantized(root / "calibrated.safetensors", model.net.state_dict(), model.artifact_meta())
                (root / CALIB_STATE_FILE).unlink(missing_ok=True)  # calibrated.safetensors supersedes it
            res = self._top1(datamodule)
            values.update(calibrated_top1=res["top1"], calibrated_top5=res["top5"])
            seconds["validate_calibrated"] = res["seconds"]
            metrics = self._write_metrics(values, seconds)
            self._log(values, "calibrate")
            fp = f" (FP {values['fp_top1']:.2f}%)" if "fp_top1" in values else ""
            rank_zero_info(
                f"calibrated top-1 {res['top1']:.2f}%{fp} in "
                f"{report.total_seconds:.1f} s ({where()}); wrote {root / 'calibrated.safetensors'} and "
                f"{root / 'metrics.json'}"
            )
            return metrics

    def fit(self, datamodule: PTQDataModule) -> dict[str, Any]:
        """The whole PTQ: calibrate, reconstruct every unit, save quantized.safetensors, validate.

        Running again with the same run folder after an interruption continues where it stopped
        (``recon_state.safetensors``, or the calibration's state). A model loaded from a calibrated
        artifact (``init_from``) skips the calibration.
        """
        model = self.model
        with self._stage(datamodule) as root:
            check_run_dir(root, model.artifact_meta())
            self._check_precision()
            if model.quantized and model.stage != "calibrated":
                raise FimaqError(f"the model is already {model.stage}: start fit from a calibrated artifact")
            synthesis = self._use_synthetic(datamodule, reconstruction=True)  # before any quantization
            if synthesis:
                self._write_metrics({}, synthesis)
            if (root / STATE_FILE).is_file() and not model.quantized:
                rank_zero_info(f"resuming from {root / STATE_FILE}")  # it holds the calibration
            elif not model.quantized:
                self.calibrate(datamodule)
            else:  # calibrated, from an artifact: measure the starting point once
                start = self._top1(datamodule)
                self._write_metrics({"calibrated_top1": start["top1"], "calibrated_top5": start["top5"]})
                rank_zero_info(f"calibrated top-1 {start['top1']:.2f}% (from --model.init_from)")
            return self._reconstruct(datamodule, root)

    def _reconstruct(self, datamodule: PTQDataModule, root: Path) -> dict[str, Any]:
        model, trainer = self.model, self.trainer
        datamodule.setup("fit")
        self._use_synthetic(datamodule, reconstruction=True)  # (fit made them: from its cache)
        images, _ = datamodule.reconstruction_tensors()
        model.to(trainer.strategy.root_device)
        report = model.reconstruct(
            images,
            state_dir=root,
            ranks=self.ranks,
            logger=trainer.logger,
            precision=trainer.precision,
            progress=self._bars,
            trainer_kwargs=self._unit_trainer_kwargs(),
        )
        values: dict[str, Any] = {
            "recon_output_mse": {
                n: [report.error_before[n], report.error_after[n]] for n in report.error_after
            },
            "recon_objective": {
                n: [report.objective_before[n], report.objective_after[n]] for n in report.objective_after
            },
            "recon_loss": model.recon_cfg.loss,
            "recon_kept_calibrated": dict(report.rejected),
            "recon_unit_seconds": {n: round(s, 3) for n, s in report.unit_seconds.items()},
            "recon_fisher_seconds": round(report.fisher_seconds, 3),
        }
        if self.ranks.is_main:
            save_quantized(root / "quantized.safetensors", model.net.state_dict(), model.artifact_meta())
            if report.error_after:
                from fimaq.recon.plot import plot_unit_errors

                title = f"{model.arch} {model.quant.w_bits}/{model.quant.a_bits}"
                plot_unit_errors(report, root / "recon_errors.png", title=title, loss=model.recon_cfg.loss)
        res = self._top1(datamodule)
        values.update(reconstructed_top1=res["top1"], reconstructed_top5=res["top5"])
        metrics = self._write_metrics(
            values, {"reconstruct": report.total_seconds, "validate_reconstructed": res["seconds"]}
        )
        self._log({"reconstructed_top1": res["top1"], "reconstructed_top5": res["top5"]}, "fit")
        rank_zero_info(
            f"top-1: {_accuracies(metrics, ('fp', 'calibrated', 'reconstructed'))}  "
            f"(reconstruction {report.total_seconds:.1f} s, {where()}); "
            f"wrote {root / 'quantized.safetensors'}"
        )
        return metrics

    def _check_precision(self) -> None:
        """Refuse a precision the quantized stages cannot run (``*-true`` conversions, 16-mixed on a
        CPU) before any work."""
        autocast(self.trainer.precision, self.trainer.strategy.root_device)

    def _use_synthetic(self, datamodule: PTQDataModule, reconstruction: bool = False) -> dict[str, float]:
        """With ``--data.synthetic true``: synthesise the calibration (and reconstruction) images from
        the float model, kept in ``<root>/synthetic.safetensors``; returns the wall seconds (empty
        without). Every rank reads that file, rank 0 writes it."""
        if not getattr(datamodule, "synthetic", False):
            return {}
        model = self.model
        model.to(self.trainer.strategy.root_device)
        start = time.perf_counter()
        made = datamodule.use_synthetic(
            model.net,
            reconstruction,
            cache_dir=self.root,
            progress=self._bars,
            fingerprint=weights_fingerprint(
                model.arch,
                model.model_kwargs,
                model.hparams.get("checkpoint_path"),
                model.hparams.get("pretrained"),
            ),
            write_cache=self.ranks.is_main,
        )
        seconds = time.perf_counter() - start
        if not made:
            return {}
        which = "calibration and reconstruction" if reconstruction else "calibration"
        rank_zero_info(
            f"synthetic {which} images from the float model in {seconds:.1f} s ({where()}); kept in "
            f"{self.root / SYNTHETIC_FILE}"
        )
        return {"synthesize": seconds}

    def _check_calibration(self, datamodule: PTQDataModule) -> None:
        """The checks of a calibration that cost nothing, before the float validation."""
        self._check_precision()
        have = getattr(datamodule, "calib_size", None)
        want = self.model.calib_cfg.num_images
        if isinstance(have, int) and want > have:
            raise FimaqError(
                f"calib.num_images={want} exceeds the data module's {have} calibration images (calib_size): "
                "raise --data.init_args.calib_size or lower --model.calib.num_images"
            )

    def _unit_trainer_kwargs(self) -> dict[str, Any]:
        """The per-unit Trainers' hardware when data parallel: the parent's accelerator, devices and a
        DDP strategy (each unit's Trainer joins the running process group). One process: none, the
        driver's default (the model's device) is the parent's device."""
        if self.ranks.world == 1:
            return {}
        return {
            "accelerator": self.trainer.strategy.root_device.type,
            "devices": self.trainer.num_devices,
            "num_nodes": self.trainer.num_nodes,
            "strategy": "ddp",
        }

    def search_bits(self, datamodule: PTQDataModule, plan: MixedPrecisionConfig | None = None) -> BitPlan:
        """LampQ: weight bits per layer under an average-bits budget; writes bit_plan.yaml/.png."""
        from fimaq.mixed_precision import plot_plan, search_bit_plan

        cfg = (plan or MixedPrecisionConfig()).validate()
        model = self.model
        if self.trainer.world_size > 1:
            raise FimaqError(
                "search_bits runs in one process: drop --trainer.strategy/--trainer.devices for it (fit and "
                "calibrate with the plan can then run data parallel)"
            )
        with self._stage(datamodule) as root:
            self._check_calibration(datamodule)
            datamodule.setup("fit")
            self._use_synthetic(datamodule)
            images, _ = datamodule.calibration_tensors()
            device = self.trainer.strategy.root_device
            start = time.perf_counter()

            def report(r: int, found: BitPlan) -> None:
                for logger in self.trainer.loggers:
                    logger.log_metrics({"search_bits/average_w_bits": found.average_w_bits}, step=r)

            result = search_bit_plan(
                lambda: model.fresh_fp().to(device),
                model.quant,
                images.to(device),
                cfg,
                model.calib_cfg,
                model.arch,
                model.model_kwargs,
                progress=self._bars,
                on_round=report,
            )
            seconds = time.perf_counter() - start
            result.save(root / "bit_plan.yaml")
            fig = plot_plan(result, root / "bit_plan.png")
            for logger in self.trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_figure"):
                    experiment.add_figure("search_bits/plan", fig)
            values = {"bit_plan_average_w_bits": result.average_w_bits, "bit_plan_rounds": len(result.rounds)}
            self._write_metrics(values, {"search_bits": seconds})
            counts: dict[int, int] = {}
            for bits in result.layers.values():
                counts[bits["w_bits"]] = counts.get(bits["w_bits"], 0) + 1
            rank_zero_info(
                f"bit plan: average {result.average_w_bits:.3f} weight bits (budget {result.budget:g}); "
                f"layers per bit-width {dict(sorted(counts.items()))}; {len(result.rounds)} rounds in "
                f"{seconds:.1f} s; wrote {root / 'bit_plan.yaml'}"
            )
            return result

    def export(
        self, datamodule: PTQDataModule, onnx: bool = True, opset: int = 18, check_images: int = 128
    ) -> dict[str, Any]:
        """Deployable files, each checked before it is (atomically) written: export.safetensors (integer
        weight codes; reloads with ``fimaq.load_quantized`` to identical outputs) and model.onnx
        (onnxruntime within ``fimaq.onnx_parity``'s tolerance of PyTorch) on calibration images."""
        from fimaq.export_onnx import write_exports

        model = self.model
        if not model.quantized:
            raise FimaqError("export needs --model.init_from a quantized artifact")
        require_int("export opset", opset, 18)
        require_int("export check_images", check_images, 1)
        with self._stage(datamodule) as root:
            check_run_dir(root, model.artifact_meta())
            datamodule.setup("fit")
            self._use_synthetic(datamodule)
            images, _ = datamodule.calibration_tensors()
            if not self.ranks.is_main:
                return {}
            start = time.perf_counter()
            values, line = write_exports(
                model.net, model.artifact_meta(), root, images[:check_images].float(), onnx=onnx, opset=opset
            )
            metrics = update_metrics(root, values, {"export": time.perf_counter() - start})
            rank_zero_info(line)
            return metrics
