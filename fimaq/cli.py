"""fimaq's command line: ``fit`` (the whole PTQ), ``calibrate``, ``search_bits``, ``validate`` and
``export`` on one YAML config, each run by a :class:`fimaq.pipeline.Pipeline` with the configured
Trainer. Bad input ends with one ``error: ...`` line and exit status 2; an interruption with one line
and 128 + the signal number (run the same command again to resume).
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningCLI

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.calib import CALIB_STATE_FILE
from fimaq.callbacks import ProgressBar
from fimaq.cli_errors import OneLineParser, check_yaml_files
from fimaq.config import MixedPrecisionConfig
from fimaq.data import PTQDataModule
from fimaq.errors import FimaqError, Interrupted, raise_interrupted
from fimaq.mixed_precision.plan import BitPlan
from fimaq.module import QuantModel
from fimaq.parallel import local_rank, stop_local_ranks
from fimaq.pipeline import Pipeline
from fimaq.recon import STATE_FILE

DESCRIPTION = (
    "fimaq: post-training quantization of timm vision transformers (ViT, DeiT, Swin, SwinV2, EVA, BEiT, "
    "CaiT, ...) to 2-8 bits (FIMA-Q calibration and "
    "Fisher-loss block reconstruction, LampQ mixed precision). Subcommands: fit (the whole pipeline), "
    "calibrate, search_bits, validate, export; each takes one YAML (-c) plus --section.key=value."
)
FIT_HELP = (
    "The whole PTQ: calibrate, reconstruct every unit (resumable), save quantized.safetensors, validate."
)
VALIDATE_HELP = "Top-1/top-5 of the model (float, or quantized with --model.init_from); writes metrics.json."
LIGHTNING_CHATTER = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:")
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")  # and their *_find_unused_* variants
LOST_PEER = re.compile(r"Connection (closed|reset) by peer|Broken pipe")  # a collective whose peer is gone
TRAINER_FIT_ONLY = {"train_dataloaders", "val_dataloaders", "ckpt_path", "weights_only", "dataloaders"}


class _QuietLightning(logging.Filter):
    """Drops Lightning's hardware-availability lines and its product tips from normal runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_CHATTER)


class FimaqTrainer(L.Trainer):
    """A Lightning Trainer with fimaq's own stages as methods (each one a subcommand); each runs a
    :class:`~fimaq.pipeline.Pipeline` with this Trainer. ``fit`` and ``validate`` stay Lightning's.
    Its progress bar (unless one is given) is :class:`fimaq.callbacks.ProgressBar`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("callbacks") or []
        callbacks = list(given) if isinstance(given, (list, tuple)) else [given]
        has_bar = any(isinstance(c, ProgressBarBase) for c in callbacks)
        if kwargs.get("enable_progress_bar", True) is not False and not has_bar:
            kwargs["callbacks"] = [*callbacks, ProgressBar()]
        super().__init__(*args, **kwargs)

    def calibrate(self, model: QuantModel, datamodule: PTQDataModule) -> dict:
        """Calibrate quantizer scales on the calibration images, save calibrated.safetensors, validate.

        Args:
            model: the model to quantize.
            datamodule: provides the calibration images.
        """
        return Pipeline(model, self).calibrate(datamodule)

    def search_bits(
        self, model: QuantModel, datamodule: PTQDataModule, plan: MixedPrecisionConfig | None = None
    ) -> BitPlan:
        """LampQ: allocate weight bits per layer under an average-bits budget; writes bit_plan.yaml/png.

        Use the plan with ``calibrate``/``fit --model.bit_plan <default_root_dir>/bit_plan.yaml``.

        Args:
            model: the model to allocate (its float weights, and a_bits for every layer).
            datamodule: provides the calibration images.
            plan: the allocation settings (``--plan.budget 3.0``, ``--plan.rounds``, ... ; see
                ``--plan.help MixedPrecisionConfig``).
        """
        return Pipeline(model, self).search_bits(datamodule, plan)

    def export(
        self,
        model: QuantModel,
        datamodule: PTQDataModule,
        onnx: bool = True,
        opset: int = 18,
        check_images: int = 128,
    ) -> dict:
        """Deployable files: export.safetensors (integer weight codes) and model.onnx, both checked.

        Args:
            model: the quantized model (``--model.init_from calibrated/quantized.safetensors``).
            datamodule: provides the check images (calibration images).
            onnx: also write ``model.onnx``.
            opset: ONNX opset (18 or later).
            check_images: calibration images the checks run on.
        """
        return Pipeline(model, self).export(datamodule, onnx, opset, check_images)


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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """As Lightning's, and the list of subcommands in ``--help`` shows fimaq's one-line description
        of ``fit`` and ``validate`` (Lightning lists its Trainer methods' docstrings)."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None)
        for choice in getattr(action, "_choices_actions", []):
            description = subparser_kwargs.get(choice.dest, {}).get("description")
            if description:
                choice.help = description

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_fp",
            type=bool,
            default=True,
            help="fit/calibrate: measure the float model's accuracy first",
        )
        parser.link_arguments("model.arch", "data.init_args.arch")
        parser.link_arguments("model.model_kwargs", "data.init_args.model_kwargs")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        staged = {"model", "datamodule"}
        return {
            "fit": staged | TRAINER_FIT_ONLY,
            "validate": staged | TRAINER_FIT_ONLY,
            "calibrate": staged,
            "search_bits": staged,
            "export": staged,
        }

    def _pipeline(self, model: QuantModel) -> Pipeline:
        cfg = self.config[self.subcommand]
        strategy = cfg.trainer.strategy
        if isinstance(strategy, str) and strategy.startswith(SPAWNING_STRATEGIES):
            raise FimaqError(
                f"fimaq runs data parallel with --trainer.strategy ddp (each process runs this command), "
                f"not {strategy}"
            )
        return Pipeline(model, self.trainer, validate_fp=cfg.validate_fp)

    # the subcommands, each run by the Pipeline (LightningCLI calls the CLI's method of that name)
    def fit(self, model: QuantModel, datamodule: PTQDataModule, **_: Any) -> dict:
        return self._pipeline(model).fit(datamodule)

    def validate(self, model: QuantModel, datamodule: PTQDataModule, verbose: bool = True, **_: Any) -> dict:
        return self._pipeline(model).validate(datamodule, verbose)

    def calibrate(self, model: QuantModel, datamodule: PTQDataModule) -> dict:
        return self._pipeline(model).calibrate(datamodule)

    def search_bits(
        self, model: QuantModel, datamodule: PTQDataModule, plan: MixedPrecisionConfig | None = None
    ) -> BitPlan:
        return self._pipeline(model).search_bits(datamodule, plan)

    def export(self, model: QuantModel, datamodule: PTQDataModule, **kwargs: Any) -> dict:
        return self._pipeline(model).export(datamodule, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python main.py`` and the ``fimaq`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_QuietLightning())
    # Lightning's own use of a torch API that torch deprecated; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # data parallel validation pads the last batch of a rank with repeated images (at most one per rank)
    warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")
    previous = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
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
            parser_kwargs={
                "description": DESCRIPTION,
                "fit": {"description": FIT_HELP},
                "validate": {"description": VALIDATE_HELP},
            },
            parser_class=OneLineParser,
            auto_configure_optimizers=False,
            trainer_defaults={"enable_checkpointing": False, "enable_model_summary": False},
            args=args,
        )
    except Interrupted as exc:
        for sig in previous:  # a second Ctrl-C while the run winds down changes nothing
            signal.signal(sig, signal.SIG_IGN)
        stop_local_ranks(exc.signum)  # data parallel: the other ranks stop with this one
        if local_rank() == 0:  # one line for the run, from the process that was started
            where = f" {exc.where}" if exc.where else ""
            print(f"interrupted{where}; run the same command again to resume", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        stop_local_ranks(signal.SIGTERM)
        message = user_error_message(exc)
        if message is None and local_rank() > 0 and LOST_PEER.search(str(exc)):
            message = f"rank {local_rank()} lost the connection to the run's other processes (rank 0 stopped)"
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
