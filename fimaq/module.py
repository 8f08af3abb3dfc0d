"""QuantModel: a timm vision transformer with fimaq's quantized layers, as a LightningModule."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from fimaq.artifacts import check_state_dict, read_artifact, resolve_checkpoint
from fimaq.calib import CALIB_STATE_FILE, CalibReport, calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig, check_model_kwargs
from fimaq.errors import FimaqError
from fimaq.layers.mode import set_quant_mode
from fimaq.mixed_precision.plan import BitPlan
from fimaq.models import create_fp_model
from fimaq.models.swap import iter_qlayers, quantize_model
from fimaq.parallel import Ranks
from fimaq.recon import STATE_FILE, ReconReport, reconstruct_model

log = logging.getLogger(__name__)

Stage = Literal["fp", "calibrated", "reconstructed"]
STAGES: tuple[Stage, ...] = ("fp", "calibrated", "reconstructed")


class QuantModel(L.LightningModule):
    """The model under quantization; ``validate`` reports top-1/top-5 in percent.

    Args:
        arch: timm model name of a registered family (ViT, DeiT, Swin, SwinV2, EVA, BEiT, CaiT, ViT-RelPos).
        checkpoint_path: float weights: a local safetensors/state-dict file, or ``embedded:NAME`` for a
            checkpoint shipped with fimaq (``embedded:digits_deit_tiny``).
        model_kwargs: overrides for ``timm.create_model`` (img_size, depth, num_classes, ...).
        pretrained: let timm download its pretrained weights (needs network access).
        quant: bit-widths (``w_bits``, ``a_bits``, head/patch-embed exceptions, per-layer overrides).
        calib: calibration search settings.
        recon: block-wise reconstruction settings (``fit``).
        fisher: Fisher statistics of the reconstruction loss (``fit``).
        bit_plan: a mixed-precision plan (``search_bits`` writes ``bit_plan.yaml``): every layer it
            names is quantized at its planned bits. It must have been made for this arch.
        init_from: a quantized artifact (``calibrated.safetensors``/``quantized.safetensors``) to start
            from; it must come from the same arch and bit-widths.
    """

    def __init__(
        self,
        arch: str = "deit_tiny_patch16_224",
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        quant: QuantSpec | None = None,
        calib: CalibConfig | None = None,
        recon: ReconConfig | None = None,
        fisher: FisherConfig | None = None,
        bit_plan: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.model_kwargs = check_model_kwargs(model_kwargs)
        self.quant = (quant or QuantSpec()).validate()
        if bit_plan:
            plan = BitPlan.load(bit_plan)
            plan.check_model(arch, self.model_kwargs, bit_plan)
            q = self.quant
            overrides = {**plan.overrides(), **q.overrides}  # explicit overrides win
            self.quant = dataclasses.replace(q, overrides=overrides).validate()
        self.calib_cfg = (calib or CalibConfig()).validate()
        self.recon_cfg = (recon or ReconConfig()).validate()
        self.fisher_cfg = (fisher or FisherConfig()).validate()
        # the settings in force, defaults included, for hparams.yaml and TensorBoard
        self.hparams.update(
            model_kwargs=self.model_kwargs,
            **{
                k: dataclasses.asdict(v)
                for k, v in (
                    ("quant", self.quant),
                    ("calib", self.calib_cfg),
                    ("recon", self.recon_cfg),
                    ("fisher", self.fisher_cfg),
                )
            },
        )
        self._checkpoint = resolve_checkpoint(checkpoint_path)
        ckpt = None if init_from else self._checkpoint
        fp = create_fp_model(
            arch,
            ckpt,
            pretrained=pretrained and not init_from,
            model_kwargs=self.model_kwargs,
            weights_follow=bool(init_from),
        )
        self.net = quantize_model(fp, self.quant)
        if bit_plan:
            plan.check_layers([q.name for q in iter_qlayers(self.net)], bit_plan)
        self._stage: Stage = "fp"
        num_classes = self.net.num_classes
        self.top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")
        if init_from:
            self.load_artifact(init_from)

    def fresh_fp(self) -> torch.nn.Module:
        """A new float model from the same checkpoint (for stages that re-quantize from scratch)."""
        if self._checkpoint is None and not self.hparams.pretrained:
            raise FimaqError("this stage needs the float weights: give --model.checkpoint_path")
        return create_fp_model(
            self.arch, self._checkpoint, pretrained=self.hparams.pretrained, model_kwargs=self.model_kwargs
        )

    # ----------------------------------------------------------------- state
    def artifact_meta(self) -> dict[str, Any]:
        """What a saved artifact records about this model."""
        return {
            "arch": self.arch,
            "model_kwargs": self.model_kwargs,
            "quant": {
                "w_bits": self.quant.w_bits,
                "a_bits": self.quant.a_bits,
                "head_a_bits": self.quant.head_a_bits,
                "overrides": self.quant.overrides,
                # recorded only when on, so artifacts from before the option still match
                **({"rotation": self.quant.rotation} if self.quant.rotation != "none" else {}),
                **({"attn_probs": self.quant.attn_probs} if self.quant.attn_probs != "uniform" else {}),
            },
            "stage": self.stage,
        }

    def load_artifact(self, path: str) -> None:
        """Load a quantized artifact made for the same arch and bit-widths."""
        state, meta = read_artifact(path)
        mine = self.artifact_meta()
        for key in ("arch", "model_kwargs", "quant"):
            if meta.get(key) != mine[key]:
                raise FimaqError(
                    f"{path} was made for {key}={meta.get(key)}, but this run has {key}={mine[key]}"
                )
        check_state_dict(self.net.state_dict(), state, f"artifact {path}", f"this {self.arch} model")
        self.net.load_state_dict(state, strict=True)
        stage = meta.get("stage", "calibrated")
        if stage not in STAGES[1:]:
            raise FimaqError(
                f"{path} holds a model in stage {stage!r}: give a calibrated or quantized artifact"
            )
        self._stage = stage
        set_quant_mode(self.net, enabled=True)

    @property
    def stage(self) -> Stage:
        """How far the model is: ``fp``, ``calibrated`` or ``reconstructed`` (set by the stages)."""
        return self._stage

    @property
    def quantized(self) -> bool:
        return self._stage != "fp"

    # ----------------------------------------------------------------- stages
    def calibrate(
        self,
        images: torch.Tensor,
        progress: bool = True,
        precision: str = "32-true",
        state_dir: str | Path | None = None,
        ranks: Ranks | None = None,
    ) -> CalibReport:
        """Calibrate every quantizer on ``images`` (docs/algorithm.md, section 2).

        Data parallel (``ranks`` of several processes): every rank passes all images; each keeps its
        shard of the first ``calib.num_images`` and the captured statistics are gathered. With
        ``state_dir`` the calibration is resumable (``CALIB_STATE_FILE`` there).
        """
        ranks = ranks or Ranks()
        images = ranks.shard(images[: self.calib_cfg.num_images])
        report = calibrate_model(
            self.net,
            images.to(self.device),
            self.calib_cfg,
            progress=progress,
            precision=precision,
            state_path=None if state_dir is None else Path(state_dir) / CALIB_STATE_FILE,
            meta=self.artifact_meta(),
            ranks=ranks,
        )
        self._stage = "calibrated"
        return report

    def reconstruct(
        self,
        images: torch.Tensor,
        state_dir: str | Path | None = None,
        ranks: Ranks | None = None,
        **kwargs: Any,
    ) -> ReconReport:
        """Reconstruct every unit on ``images`` (docs/algorithm.md, sections 3 and 4); resumes from
        ``state_dir`` (a float model can resume there: the state holds the calibration).

        Data parallel (``ranks`` of several processes): every rank passes all images and keeps its
        shard. ``kwargs`` go to :func:`fimaq.recon.reconstruct_model`.
        """
        resuming = state_dir is not None and (Path(state_dir) / STATE_FILE).is_file()
        if not self.quantized and not resuming:
            raise FimaqError(
                "reconstruction needs a calibrated model: calibrate first (or --model.init_from)"
            )
        ranks = ranks or Ranks()
        report = reconstruct_model(
            self.net,
            ranks.shard(images).to(self.device),
            self.recon_cfg,
            self.fisher_cfg,
            state_dir=state_dir,
            meta=self.artifact_meta(),
            ranks=ranks,
            **kwargs,
        )
        self._stage = "reconstructed"
        return report

    def use_quantization(self, enabled: bool) -> None:
        """Run the network quantized (True) or in float (False)."""
        set_quant_mode(self.net, enabled=enabled)

    # ----------------------------------------------------------------- lightning
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        if not torch.isfinite(logits).all():
            raise FimaqError(f"the model produced NaN/Inf logits on validation batch {batch_idx}")
        self.top1.update(logits, y)
        self.top5.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        # percentages, as everywhere else (the metrics gather their state over data-parallel ranks)
        self.log("val/top1", 100 * self.top1.compute(), prog_bar=True)
        self.log("val/top5", 100 * self.top5.compute())
        self.top1.reset()
        self.top5.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
