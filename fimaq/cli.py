"""fimaq's LightningCLI: ``fit`` (the whole PTQ), ``calibrate``, ``search_bits``, ``validate`` and
``export`` on one YAML config.

Every run writes ``<default_root_dir>/metrics.json`` (accuracies in percent and wall seconds per
stage); ``calibrate`` also writes ``<default_root_dir>/calibrated.safetensors``, ``fit`` also
``recon_state.safetensors`` (after every unit, for resuming), ``quantized.safetensors`` and
``recon_errors.png``; ``export`` writes ``export.safetensors`` and ``model.onnx``. Bad input ends
with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.artifacts import save_quantized, update_metrics
from fimaq.calib import CALIB_STATE_FILE
from fimaq.cli_errors import OneLineParser, check_yaml_files
from fimaq.config import MixedPrecisionConfig
from fimaq.data import PTQDataModule
from fimaq.errors import FimaqError, Interrupted
from fimaq.mixed_precision.plan import BitPlan
from fimaq.module import QuantModel
from fimaq.recon import STATE_FILE
from fimaq.run_dir import check_run_dir, run_lock

log = logging.getLogger(__name__)

DESCRIPTION = (
    "fimaq: post-training quantization of timm ViT/DeiT/Swin models to 2-8 bits (FIMA-Q calibration and "
    "Fisher-loss block reconstruction, LampQ mixed precision). Subcommands: fit (the whole pipeline), "
    "calibrate, search_bits, validate, export; each takes one YAML (-c) plus --section.key=value."
)
LIGHTNING_CHATTER = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:")


class _QuietLightning(logging.Filter):
    """Drops Lightning's hardware-availability lines and its product tips from normal runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_CHATTER)


def _where() -> str:
    """What the timings ran on: the CPU capability and thread count (and the GPU when one is used)."""
    where = f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    return where + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def _validate_top1(
    trainer: L.Trainer, model: QuantModel, datamodule: L.LightningDataModule
) -> dict[str, float]:
    start = time.perf_counter()
    result = L.Trainer.validate(trainer, model, datamodule=datamodule, verbose=False)[0]
    return {
        "top1": round(float(result["val/top1"]), 4),
        "top5": round(float(result["val/top5"]), 4),
        "seconds": time.perf_counter() - start,
    }


def _require_ptq_data(datamodule: Any) -> None:
    if not isinstance(datamodule, PTQDataModule):
        raise FimaqError(
            f"{type(datamodule).__name__} is not a fimaq.data.PTQDataModule: the stages need its "
            "calibration and reconstruction tensors"
        )


def _owning_run_dir(stage: Callable) -> Callable:
    """Run a stage holding the lock of ``default_root_dir`` (rank 0 takes it; nested stages share it)."""

    @functools.wraps(stage)
    def run(self: FimaqTrainer, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_holds_run_dir", False):
            return stage(self, *args, **kwargs)
        self.start_ranks()
        with run_lock(self.default_root_dir, enabled=self.is_global_zero):
            self._holds_run_dir = True
            try:
                return stage(self, *args, **kwargs)
            finally:
                self._holds_run_dir = False

    return run


class FimaqTrainer(L.Trainer):
    """A Lightning Trainer with fimaq's stages as methods (each one a CLI subcommand).

    With ``--trainer.strategy ddp --trainer.devices N`` every stage runs on N processes (gloo on CPU,
    NCCL on GPUs): each rank holds a shard of the calibration and reconstruction images, statistics
    and gradients are reduced over the ranks, and only rank 0 writes files and logs.
    """

    def start_ranks(self) -> None:
        """Start the other processes and the process group (data-parallel strategies), once."""
        if self.world_size <= 1 or torch.distributed.is_initialized():
            return
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        launcher = self.strategy.launcher
        if not isinstance(launcher, _SubprocessScriptLauncher):
            raise FimaqError(
                f"fimaq runs data parallel with --trainer.strategy ddp, not {type(self.strategy).__name__} "
                f"with {type(launcher).__name__}"
            )
        launcher.launch(lambda: None, trainer=self)  # rank 0 starts the others: they run this command
        self.strategy.setup_environment()
        rank_zero_info(f"data parallel: {self.world_size} processes ({self.strategy.process_group_backend})")

    def validate(
        self,
        model: QuantModel | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: L.LightningDataModule | None = None,
    ):
        """Evaluate the model (float, or quantized with --model.init_from) on the validation set;
        writes top-1/top-5 (percent) to metrics.json.

        Args:
            model: the model to evaluate.
            dataloaders: plain Lightning validation on these loaders instead (no metrics.json).
            ckpt_path: plain Lightning validation from this Lightning checkpoint instead.
            verbose: print the result.
            datamodule: provides the validation loader.
        """
        if not isinstance(model, QuantModel) or dataloaders is not None or ckpt_path is not None:
            return super().validate(model, dataloaders, ckpt_path, verbose, datamodule)
        return self._validate_quant(model, datamodule, verbose)

    @_owning_run_dir
    def _validate_quant(self, model: QuantModel, datamodule: L.LightningDataModule | None, verbose: bool):
        res = _validate_top1(self, model, datamodule)
        key = "fp" if not model.quantized else model.stage
        if self.is_global_zero:
            update_metrics(
                self.default_root_dir,
                {f"{key}_top1": res["top1"], f"{key}_top5": res["top5"]},
                {f"validate_{key}": res["seconds"]},
            )
        if verbose:
            rank_zero_info(
                f"{key} top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%; wrote "
                f"{Path(self.default_root_dir) / 'metrics.json'}"
            )
        return [{"val/top1": res["top1"], "val/top5": res["top5"]}]

    @_owning_run_dir
    def calibrate(
        self, model: QuantModel, datamodule: L.LightningDataModule, validate_fp: bool = True
    ) -> dict:
        """Calibrate quantizer scales on the calibration images, save calibrated.safetensors, validate.

        Args:
            model: the model to quantize.
            datamodule: must provide ``calibration_tensors()``.
            validate_fp: also measure the float model's accuracy first.
        """
        _require_ptq_data(datamodule)
        if model.quantized:
            raise FimaqError("the model is already quantized (--model.init_from): nothing to calibrate")
        self.start_ranks()
        root = Path(self.default_root_dir)
        check_run_dir(root, model.artifact_meta())
        values: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        if validate_fp:
            fp = _validate_top1(self, model, datamodule)
            values.update(fp_top1=fp["top1"], fp_top5=fp["top5"])
            seconds["validate_fp"] = fp["seconds"]
            rank_zero_info(f"FP top-1 {fp['top1']:.2f}%")
        datamodule.setup("fit")
        images, _ = datamodule.calibration_tensors()
        model.to(self.strategy.root_device)
        bars = self.is_global_zero and self.progress_bar_callback is not None
        report = model.calibrate(images, progress=bars, precision=self.precision, state_dir=root)
        seconds["calibrate"] = report.total_seconds
        values["calibration_seconds_per_layer"] = round(report.seconds_per_layer, 4)
        if self.is_global_zero:
            save_quantized(root / "calibrated.safetensors", model.net.state_dict(), model.artifact_meta())
            (root / CALIB_STATE_FILE).unlink(missing_ok=True)  # calibrated.safetensors supersedes it
        res = _validate_top1(self, model, datamodule)
        values.update(calibrated_top1=res["top1"], calibrated_top5=res["top5"])
        seconds["validate_calibrated"] = res["seconds"]
        if self.is_global_zero:
            metrics = update_metrics(root, values, seconds)
            for logger in self.loggers:
                logger.log_metrics({f"calibrate/{k}": v for k, v in values.items() if isinstance(v, float)})
        rank_zero_info(
            f"calibrated top-1 {res['top1']:.2f}% (FP {values.get('fp_top1', float('nan')):.2f}%) in "
            f"{report.total_seconds:.1f} s ({_where()}); wrote {root / 'calibrated.safetensors'} and "
            f"{root / 'metrics.json'}"
        )
        return metrics if self.is_global_zero else values

    @_owning_run_dir
    def fit(self, model: QuantModel, datamodule: L.LightningDataModule, validate_fp: bool = True) -> dict:
        """The whole PTQ: calibrate, reconstruct every unit, save quantized.safetensors, validate.

        Re-running with the same ``trainer.default_root_dir`` after an interruption continues at the
        first unfinished unit (``recon_state.safetensors``). ``--model.init_from calibrated.safetensors``
        skips the calibration.

        Args:
            model: the model to quantize.
            datamodule: must provide ``calibration_tensors()`` and ``reconstruction_tensors()``.
            validate_fp: also measure the float model's accuracy first.
        """
        _require_ptq_data(datamodule)
        self.start_ranks()
        root = Path(self.default_root_dir)
        check_run_dir(root, model.artifact_meta())
        if (root / STATE_FILE).is_file() and not model.quantized:
            rank_zero_info(f"resuming from {root / STATE_FILE}")
            model.stage = "calibrated"  # the state (calibrated + finished units) is loaded by the driver
        elif not model.quantized:
            self.calibrate(model, datamodule, validate_fp=validate_fp)
        elif model.stage == "calibrated":  # --model.init_from: measure the starting point once
            start = _validate_top1(self, model, datamodule)
            if self.is_global_zero:
                update_metrics(root, {"calibrated_top1": start["top1"], "calibrated_top5": start["top5"]})
            rank_zero_info(f"calibrated top-1 {start['top1']:.2f}% (from --model.init_from)")
        else:
            raise FimaqError(f"the model is already {model.stage}: start fit from a calibrated artifact")
        datamodule.setup("fit")
        images, _ = datamodule.reconstruction_tensors()
        model.to(self.strategy.root_device)
        report = model.reconstruct(
            images,
            state_dir=root,
            logger=self.logger,
            precision=self.precision,
            progress=self.is_global_zero and self.progress_bar_callback is not None,
        )
        values: dict[str, Any] = {
            "recon_output_mse": {
                n: [report.error_before[n], report.error_after[n]] for n in report.error_after
            },
            "recon_fisher_seconds": round(report.fisher_seconds, 3),
        }
        seconds = {"reconstruct": report.total_seconds}
        if self.is_global_zero:
            save_quantized(root / "quantized.safetensors", model.net.state_dict(), model.artifact_meta())
            if report.error_after:
                from fimaq.recon.plot import plot_unit_errors

                plot_unit_errors(
                    report,
                    root / "recon_errors.png",
                    title=f"{model.arch} {model.quant.w_bits}/{model.quant.a_bits}",
                )
        res = _validate_top1(self, model, datamodule)
        values.update(reconstructed_top1=res["top1"], reconstructed_top5=res["top5"])
        seconds["validate_reconstructed"] = res["seconds"]
        metrics = values
        if self.is_global_zero:
            metrics = update_metrics(root, values, seconds)
            for logger in self.loggers:
                logger.log_metrics(
                    {"fit/reconstructed_top1": res["top1"], "fit/reconstructed_top5": res["top5"]}
                )
        fp, cal = metrics.get("fp_top1", float("nan")), metrics.get("calibrated_top1", float("nan"))
        rank_zero_info(
            f"top-1: FP {fp:.2f}%  calibrated {cal:.2f}%  reconstructed {res['top1']:.2f}%  "
            f"(reconstruction {report.total_seconds:.1f} s, {_where()}); "
            f"wrote {root / 'quantized.safetensors'}"
        )
        return metrics

    @_owning_run_dir
    def search_bits(
        self,
        model: QuantModel,
        datamodule: L.LightningDataModule,
        plan: MixedPrecisionConfig | None = None,
    ) -> BitPlan:
        """LampQ: allocate weight bits per layer under an average-bits budget; writes bit_plan.yaml/png.

        Use the plan with ``calibrate``/``fit --model.bit_plan <default_root_dir>/bit_plan.yaml``.

        Args:
            model: the model to allocate (its float weights, and a_bits for every layer).
            datamodule: provides the calibration images.
            plan: the allocation settings (``--plan.budget 3.0``, ``--plan.rounds``, ... ; see
                ``--plan.help MixedPrecisionConfig``).
        """
        from fimaq.mixed_precision import plot_plan, search_bit_plan

        cfg = (plan or MixedPrecisionConfig()).validate()
        _require_ptq_data(datamodule)
        if self.world_size > 1:
            raise FimaqError(
                "search_bits runs in one process: drop --trainer.strategy/--trainer.devices for it (fit and "
                "calibrate with the plan can then run data parallel)"
            )
        root = Path(self.default_root_dir)
        datamodule.setup("fit")
        images, _ = datamodule.calibration_tensors()
        device = self.strategy.root_device
        start = time.perf_counter()

        def make_fp():
            return model.fresh_fp().to(device)

        def report(r: int, plan: BitPlan) -> None:
            for logger in self.loggers:
                logger.log_metrics({"search_bits/average_w_bits": plan.average_w_bits}, step=r)

        plan = search_bit_plan(
            make_fp,
            model.quant,
            images.to(device),
            cfg,
            model.calib_cfg,
            model.arch,
            model.model_kwargs,
            progress=self.is_global_zero and self.progress_bar_callback is not None,
            on_round=report,
        )
        seconds = time.perf_counter() - start
        if self.is_global_zero:
            plan.save(root / "bit_plan.yaml")
            fig = plot_plan(plan, root / "bit_plan.png")
            for logger in self.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_figure"):
                    experiment.add_figure("search_bits/plan", fig)
            update_metrics(
                root,
                {"bit_plan_average_w_bits": plan.average_w_bits, "bit_plan_rounds": len(plan.rounds)},
                {"search_bits": seconds},
            )
        counts: dict[int, int] = {}
        for bits in plan.layers.values():
            counts[bits["w_bits"]] = counts.get(bits["w_bits"], 0) + 1
        rank_zero_info(
            f"bit plan: average {plan.average_w_bits:.3f} weight bits (budget {plan.budget:g}); layers per "
            f"bit-width {dict(sorted(counts.items()))}; {len(plan.rounds)} rounds in {seconds:.1f} s; "
            f"wrote {root / 'bit_plan.yaml'}"
        )
        return plan

    @_owning_run_dir
    def export(
        self,
        model: QuantModel,
        datamodule: L.LightningDataModule,
        onnx: bool = True,
        opset: int = 18,
        check_images: int = 128,
    ) -> dict:
        """Deployable files: export.safetensors (integer weight codes) and model.onnx, both checked.

        ``export.safetensors`` must reload with ``fimaq.load_quantized`` into a model with identical
        outputs, and ``model.onnx`` must match PyTorch in onnxruntime within the tolerance stated in
        ``fimaq.export_onnx``, on calibration images, before either file is (atomically) written.

        Args:
            model: the quantized model (``--model.init_from calibrated/quantized.safetensors``).
            datamodule: must provide ``calibration_tensors()`` (the check images).
            onnx: also write ``model.onnx``.
            opset: ONNX opset (18 or later).
            check_images: calibration images the checks run on.
        """
        from fimaq.errors import require_int
        from fimaq.export_onnx import write_exports

        if not model.quantized:
            raise FimaqError("export needs --model.init_from a quantized artifact")
        _require_ptq_data(datamodule)
        require_int("export opset", opset, 18)
        require_int("export check_images", check_images, 1)
        root = Path(self.default_root_dir)
        check_run_dir(root, model.artifact_meta())
        datamodule.setup("fit")
        images, _ = datamodule.calibration_tensors()
        images = images[:check_images].float()
        if not self.is_global_zero:
            return {}
        start = time.perf_counter()
        values, line = write_exports(model.net, model.artifact_meta(), root, images, onnx=onnx, opset=opset)
        metrics = update_metrics(root, values, {"export": time.perf_counter() - start})
        rank_zero_info(line)
        return metrics


class FimaqCLI(LightningCLI):
    """LightningCLI with fimaq's subcommands; the data module follows the model's arch and kwargs."""

    def before_instantiate_classes(self) -> None:
        """TensorBoard logs go to ``<default_root_dir>/version_N`` (not a nested lightning_logs/), with no
        placeholder ``hp_metric``; a resumed ``calibrate``/``fit`` logs on into the interrupted run's
        version. An explicit ``--trainer.logger`` is kept."""
        cfg = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        if cfg.logger in (None, True):
            from jsonargparse import Namespace

            root = Path(cfg.default_root_dir or ".")
            version = None  # a new version_N, except when resuming: the run goes on in its own
            resuming = (self.subcommand == "fit" and (root / STATE_FILE).is_file()) or (
                self.subcommand in ("fit", "calibrate") and (root / CALIB_STATE_FILE).is_file()
            )
            if resuming:
                numbers = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
                version = max(numbers) if numbers else None
            cfg.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=str(root), name="", version=version, default_hp_metric=False),
            )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.arch", "data.init_args.arch")
        parser.link_arguments("model.model_kwargs", "data.init_args.model_kwargs")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "datamodule"},
            "search_bits": {"model", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "calibrate": {"model", "datamodule"},
            "export": {"model", "datamodule"},
        }


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python main.py`` and the ``fimaq`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_QuietLightning())
    # Lightning's own use of a torch API that torch deprecated; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # data parallel validation pads the last batch of a rank with repeated images (at most one per rank)
    warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    argv = list(sys.argv[1:] if args is None else args)
    OneLineParser.args = argv
    try:
        check_yaml_files(argv)
        FimaqCLI(
            QuantModel,
            PTQDataModule,
            subclass_mode_data=True,
            trainer_class=FimaqTrainer,
            seed_everything_default=3407,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            parser_class=OneLineParser,
            auto_configure_optimizers=False,
            trainer_defaults={"enable_checkpointing": False, "enable_model_summary": False},
            args=args,
        )
    except Interrupted as exc:
        where = f" {exc.where}" if exc.where else ""
        print(f"interrupted{where}; run the same command again to resume", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM: stop where the run is (finished units and written files stay) and say so."""
    raise Interrupted(signum)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a bad-input error, also when jsonargparse wrapped it while
    instantiating a class (it reports the constructor's error among the tried Union types)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, FimaqError):
            text = str(seen)
            # raised in a DataLoader worker: the message carries the worker's traceback; keep its error
            inner = [ln for ln in text.splitlines() if ln.startswith(f"{FimaqError.__module__}.FimaqError: ")]
            return inner[-1].split(": ", 1)[1] if inner else text.splitlines()[0] if text else text
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if isinstance(exc, ValueError) and "Errors:" in text:
        for line in text.split("Errors:", 1)[1].splitlines():
            line = line.strip().removeprefix("- ").strip()
            if line and not line.startswith("Expected a <class 'NoneType'>"):
                return line
    return None
