"""Typed configuration objects shared by the stages (LightningCLI builds them from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from fimaq.errors import FimaqError, require_choice, require_fraction, require_int
from fimaq.spec import QuantSpec, Rotation, check_model_kwargs  # noqa: F401  (re-exported: one import)

EQ_N_MIN = 32
"""Smallest grid: ``num_scale = eq_n // num_zp`` scales per zero point with up to 16 zero points, and a
grid needs two scales per zero point to reach from the (q0.1, q0.9) range to the full range (one scale
clips every tensor to its inner 80%)."""


@dataclass
class CalibConfig:
    """Scale search of the calibration stage (docs/algorithm.md, section 2).

    Attributes:
        num_images: calibration images (taken from the data module's calibration set).
        eq_n: candidates per grid (at least 32).
        search_rounds: alternating weight/activation rounds after the initial search.
        batch_size: images per forward pass while capturing.
        candidate_chunk: candidates evaluated at once (bounds memory; no effect on the result).
        images_per_chunk: images per slice of the output-error searches and of the matmul sweeps (speed
            only).
        fold_layernorm: fold per-channel input scales of qkv/fc1/reduction into the preceding LayerNorm.
        recapture_after_fold: capture a unit's remaining layers again after a fold (bit-faithful to the
            reference's float rounding; off saves one forward pass per fold).
    """

    num_images: int = 128
    eq_n: int = 128
    search_rounds: int = 3
    batch_size: int = 32
    candidate_chunk: int = 16
    images_per_chunk: int = 8
    fold_layernorm: bool = True
    recapture_after_fold: bool = True

    def validate(self) -> CalibConfig:
        """Check the settings; returns self."""
        for key in ("num_images", "batch_size", "candidate_chunk", "images_per_chunk"):
            require_int(f"calibration {key}", getattr(self, key), 1)
        require_int(
            "calibration eq_n",
            self.eq_n,
            EQ_N_MIN,
            note=" (a grid spans up to 16 zero points, with at least two scales for each)",
        )
        require_int("calibration search_rounds", self.search_rounds, 0)
        return self


ReconLoss = Literal["mse", "fisher_diag", "fisher_lr", "fisher_dplr", "fisher_brecq", "global_local"]
InputMode = Literal["qdrop", "qinp", "rinp"]
CacheDtype = Literal["float32", "bfloat16", "float16"]
Rounding = Literal["adaround", "ste"]
NormRounding = Literal["soft", "hard"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
RECON_LOSSES, INPUT_MODES, CACHE_DTYPES = get_args(ReconLoss), get_args(InputMode), get_args(CacheDtype)
ROUNDINGS = get_args(Rounding)
STE_STEPS, ADAROUND_STEPS = 3000, 20000  # the STE schedule at the ImageNet one: ste_iters = 0.15 iters


@dataclass
class ReconConfig:
    """Block-wise reconstruction (docs/algorithm.md, section 3); the defaults are the official constants.

    Attributes:
        iters: optimisation steps per unit (with ``rounding: ste``, the schedule ``ste_iters`` derives from).
        batch_size: images per step (random indices into the reconstruction cache).
        loss: ``mse`` | ``fisher_diag`` | ``fisher_lr`` | ``fisher_dplr`` | ``fisher_brecq`` |
            ``global_local`` (the unit's output through the frozen float rest of the model to the
            penultimate features, plus ``local_weight`` times the unit's own output error; ViT/DeiT)
            (head: KL).
        local_weight: weight of the unit's own output error in ``global_local``.
        input_mode: unit input per step: ``qdrop`` (element-wise mix of quantized and FP input),
            ``qinp`` (quantized input), ``rinp`` (FP input).
        drop_prob: probability that an element takes its quantized value (QDrop, input mix).
        learn_act_scales: train the activation scales of the unit (with the STE).
        rounding: how the weights are rounded: ``adaround`` (learned up/down rounding with a
            regulariser, the official method) or ``ste`` (a learned offset rounded straight-through,
            no regulariser, its own shorter schedule ``ste_iters``).
        ste_iters: optimisation steps per unit with ``rounding: ste``; ``null`` = ``iters * 3000 / 20000``
            rounded (at least 1): 3000 at the ImageNet schedule of 20000.
        lr_alpha: Adam learning rate of the AdaRound variables (constant).
        lr_ste: Adam learning rate of the STE offsets (constant; the offsets count quantization steps).
        lr_scale: Adam learning rate of the activation scales (cosine to 0 over the unit's steps).
        round_weight: weight lambda of the rounding regulariser.
        norm_rounding: the output the loss normalisers are recorded on at the first step and after each
            Fisher refresh: ``hard`` [fimaq], with the AdaRound rounding hardened as it stands, or
            ``soft``, the step's soft-rounded output (FIMA-Q's reference). Where the soft weights alone
            can fit a unit's float output (the patch embedding: a float input, no activation
            quantizers), ``soft`` records normalisers near zero at the end of the warm-up; the rounding
            penalty can then no longer make the rounding binary, and the unit ends worse than
            calibrated (docs/algorithm.md, section 4).
        keep_better: [fimaq] a unit whose reconstruction ends with a higher objective than its
            calibration (both measured on the ``error_images`` with the final normalisers and Fisher
            statistics) keeps its calibrated rounding and activation scales.
        beta_start: rounding temperature during the warm-up and at its end.
        beta_end: rounding temperature at the last step.
        warmup: fraction of the steps without rounding regulariser.
        cache_device: where the unit caches live (``null`` = the model's device).
        cache_dtype: ``float32`` | ``bfloat16`` | ``float16`` (cast to float32 per batch).
        error_images: images used for the per-unit output error logged before/after (0 = all).
        seed: seed of minibatch indices, input mixing and QDrop masks (one stream per unit).
        compile: compile each unit's training step with ``torch.compile``: the QDrop mix, the unit's
            forward pass with its straight-through fake quantization and AdaRound's soft weights, the
            loss and the rounding penalty, backward included (Triton kernels on a GPU, C++ on the
            CPU, which needs a compiler). Each unit compiles once or twice (tens of seconds on a small
            CPU); the numbers match the eager step to float rounding, the QDrop draws are the
            compiler's own (another random stream, the same distribution).
        compile_mode: ``torch.compile``'s mode: ``reduce-overhead`` adds CUDA graphs on a GPU.
    """

    iters: int = 20000
    batch_size: int = 32
    loss: ReconLoss = "fisher_dplr"
    local_weight: float = 1.0
    input_mode: InputMode = "qdrop"
    drop_prob: float = 0.5
    learn_act_scales: bool = True
    rounding: Rounding = "adaround"
    ste_iters: int | None = None
    lr_alpha: float = 1e-3
    lr_ste: float = 1e-3
    lr_scale: float = 4e-5
    round_weight: float = 0.01
    norm_rounding: NormRounding = "hard"
    keep_better: bool = True
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    cache_device: str | None = None
    cache_dtype: CacheDtype = "float32"
    error_images: int = 256
    seed: int = 0
    compile: bool = False
    compile_mode: CompileMode = "default"

    def validate(self) -> ReconConfig:
        """Check the settings; returns self."""
        require_int("recon iters", self.iters, 1)
        if self.ste_iters is not None:
            require_int("recon ste_iters", self.ste_iters, 1)
        require_int("recon batch_size", self.batch_size, 1)
        require_int("recon error_images", self.error_images, 0)
        require_int("recon seed", self.seed, 0)
        require_choice("recon loss", self.loss, RECON_LOSSES)
        require_choice("recon input_mode", self.input_mode, INPUT_MODES)
        require_choice("recon cache_dtype", self.cache_dtype, CACHE_DTYPES)
        require_choice("recon rounding", self.rounding, ROUNDINGS)
        require_choice("recon norm_rounding", self.norm_rounding, get_args(NormRounding))
        require_choice("recon compile_mode", self.compile_mode, get_args(CompileMode))
        require_fraction("recon drop_prob", self.drop_prob)
        for key in ("compile", "keep_better"):
            if not isinstance(getattr(self, key), bool):
                raise FimaqError(f"recon {key} must be true or false, got {getattr(self, key)!r}")
        require_fraction("recon warmup", self.warmup, closed_right=False)
        for key in (
            "lr_alpha",
            "lr_ste",
            "lr_scale",
            "round_weight",
            "beta_start",
            "beta_end",
            "local_weight",
        ):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise FimaqError(f"recon {key} must be a finite number >= 0, got {value!r}")
        return self

    @property
    def unit_iters(self) -> int:
        """The optimisation steps of every unit: ``iters`` with AdaRound, ``ste_iters`` (or its default
        ``round(iters * 3000 / 20000)``, at least 1) with STE rounding."""
        if self.rounding != "ste":
            return self.iters
        if self.ste_iters is not None:
            return self.ste_iters
        return max(1, round(self.iters * STE_STEPS / ADAROUND_STEPS))


@dataclass
class FisherConfig:
    """Fisher statistics of the reconstruction loss (docs/algorithm.md, section 4).

    Attributes:
        rank: k, the number of refreshes (and the final rank of the low-rank part).
        mode: ``q`` refreshes every ``iters // rank`` steps; ``qf`` refreshes on the first ``rank`` steps.
        temperature: T of the soft targets ``softmax(logits_FP / T)`` and of the model in the KL.
        p1: weight of the low-rank term of ``fisher_dplr``.
        p2: weight of the diagonal term of ``fisher_dplr``.
        num_samples: reconstruction images used per refresh (``null`` = all; a seeded subset otherwise).
        lowrank_tokens: ``all`` tokens, or ``cls`` (the class token only) for the low-rank part; units
            without a class token (patch embedding, Swin) always use all tokens.
        ridge: relative ridge added to ``Delta Delta^T`` before inverting (``0`` = plain inverse).
        batch_size: images per forward/backward pass of a refresh.
    """

    rank: int = 5
    mode: Literal["q", "qf"] = "q"
    temperature: float = 20.0
    p1: float = 1.0
    p2: float = 1.0
    num_samples: int | None = None
    lowrank_tokens: Literal["all", "cls"] = "all"
    ridge: float = 1e-8
    batch_size: int = 32

    def validate(self) -> FisherConfig:
        """Check the settings; returns self."""
        require_int("fisher rank", self.rank, 1)
        require_int("fisher batch_size", self.batch_size, 1)
        if self.num_samples is not None:
            require_int("fisher num_samples", self.num_samples, 1)
        require_choice("fisher mode", self.mode, ("q", "qf"))
        require_choice("fisher lowrank_tokens", self.lowrank_tokens, ("all", "cls"))
        for key in ("temperature", "p1", "p2", "ridge"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise FimaqError(f"fisher {key} must be a finite number >= 0, got {value!r}")
        if self.temperature == 0:
            raise FimaqError("fisher temperature must be > 0")
        return self

    def refresh_steps(self, iters: int) -> list[int]:
        """Steps (0-based) at which the statistics are refreshed; the rank grows by one at each."""
        if self.mode == "qf":
            return list(range(min(self.rank, iters)))
        every = max(1, iters // self.rank)
        return [j * every for j in range(self.rank) if j * every < iters]


@dataclass
class MixedPrecisionConfig:
    """LampQ bit allocation (docs/algorithm.md, section 5).

    Attributes:
        budget: the average weight bits (weighted by layer size) the plan may use.
        candidates: bit-widths a layer may take.
        min_bits: smallest weight bits of any layer.
        max_bits: largest weight bits of any layer.
        rounds: allocation rounds; round 0 measures the sensitivity on the uniformly quantized model
            (the largest candidate within the budget), every later one on the previous allocation.
            Stops early when an allocation repeats.
        normalise: ``type`` (alpha_t = 1 / mean trace of the layer type) or ``none`` (ablation).
        micro_batch: images per gradient of the Fisher trace (1 = per-sample).
        temperature: T of the KL between FP and quantized predictions.
        num_images: images for the Fisher trace (default: all calibration images).
        include_patch_embed: also allocate the patch embedding's bits (else it keeps ``w_bits``).
        include_head: also allocate the classifier's bits (else it keeps ``w_bits``).
        layer_bits: per-layer ``[min, max]`` weight bits, ``{layer name: [min, max]}``, within the
            global range (e.g. keep ``blocks.0.attn.qkv`` at 4 bits or more).
    """

    budget: float = 3.0
    candidates: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])
    min_bits: int = 2
    max_bits: int = 8
    rounds: int = 3
    normalise: Literal["type", "none"] = "type"
    micro_batch: int = 1
    temperature: float = 1.0
    num_images: int | None = None
    include_patch_embed: bool = False
    include_head: bool = False
    layer_bits: dict[str, list[int]] = field(default_factory=dict)

    def validate(self) -> MixedPrecisionConfig:
        """Check the settings; returns self."""
        if not self.candidates:
            raise FimaqError("mixed precision: the candidate bit-widths are empty")
        for b in self.candidates:
            require_int("mixed precision candidate bits", b, 2, 8)
        require_int("mixed precision min_bits", self.min_bits, 2, 8)
        require_int("mixed precision max_bits", self.max_bits, 2, 8)
        if self.min_bits > self.max_bits:
            raise FimaqError(f"mixed precision min_bits={self.min_bits} > max_bits={self.max_bits}")
        if not self.allowed_bits():
            raise FimaqError(
                f"no candidate bit-width {sorted(self.candidates)} lies in [{self.min_bits}, {self.max_bits}]"
            )
        for name, bounds in self.layer_bits.items():
            if len(bounds) != 2:
                raise FimaqError(f"mixed precision layer_bits[{name!r}] must be [min, max], got {bounds!r}")
            lo, hi = (require_int(f"mixed precision layer_bits[{name!r}]", b, 2, 8) for b in bounds)
            if not any(lo <= b <= hi for b in self.allowed_bits()):
                allowed = self.allowed_bits()
                raise FimaqError(
                    f"mixed precision layer_bits[{name!r}] = [{lo}, {hi}] leaves none of {allowed}"
                )
        require_int("mixed precision rounds", self.rounds, 1)
        require_int("mixed precision micro_batch", self.micro_batch, 1)
        if self.num_images is not None:
            require_int("mixed precision num_images", self.num_images, 1)
        require_choice("mixed precision normalise", self.normalise, ("type", "none"))
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 8:
            raise FimaqError(
                f"mixed precision budget must be average weight bits in (0, 8], got {self.budget!r}"
            )
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise FimaqError(f"mixed precision temperature must be > 0, got {self.temperature!r}")
        return self

    def allowed_bits(self, layer: str | None = None) -> list[int]:
        """The candidates within [min_bits, max_bits] (and the layer's own bounds), ascending."""
        lo, hi = self.layer_bits.get(layer, (self.min_bits, self.max_bits)) if layer else (2, 8)
        return sorted({b for b in self.candidates if self.min_bits <= b <= self.max_bits and lo <= b <= hi})
