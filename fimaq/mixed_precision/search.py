"""search_bit_plan: LampQ's allocation loop. Measure the type-aware Fisher sensitivity on a
calibrated quantized model, solve the ILP, quantize with the new allocation, repeat."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, MixedPrecisionConfig, QuantSpec
from fimaq.errors import FimaqError
from fimaq.mixed_precision.ilp import check_budget, solve_allocation
from fimaq.mixed_precision.plan import BitPlan
from fimaq.mixed_precision.sensitivity import fisher_traces, quantization_errors, type_normalise
from fimaq.models.swap import iter_qlayers, quantize_model
from fimaq.recon.cache import soft_targets

log = logging.getLogger(__name__)

ALLOCATED_ROLES = ("qkv", "proj", "fc1", "fc2", "reduction")


def allocatable_layers(net: nn.Module, cfg: MixedPrecisionConfig) -> dict[str, tuple[nn.Module, str]]:
    """name -> (layer, type) of the layers whose weight bits the plan chooses, in model order."""
    roles = set(ALLOCATED_ROLES)
    if cfg.include_patch_embed:
        roles.add("patch_embed")
    if cfg.include_head:
        roles.add("head")
    return {q.name: (q.module, q.role) for q in iter_qlayers(net) if q.role in roles}


def search_bit_plan(
    make_fp: Callable[[], nn.Module],
    spec: QuantSpec,
    images: torch.Tensor,
    cfg: MixedPrecisionConfig,
    calib: CalibConfig,
    arch: str,
    model_kwargs: dict,
    progress: bool = True,
    on_round: Callable[[int, BitPlan], None] | None = None,
) -> BitPlan:
    """Allocate weight bits per layer under ``cfg.budget`` (activations stay at ``spec.a_bits``).

    Args:
        make_fp: returns a fresh float model (called once per round, once for the layer sizes and once
            for the soft targets).
        spec: the uniform bit-widths (activation bits, and weight bits of layers not allocated).
        images: calibration images (also used for the Fisher traces).
        cfg: allocation settings.
        calib: calibration settings for every round's quantized model.
        arch: recorded in the plan.
        model_kwargs: recorded in the plan.
        progress: show calibration progress bars.
        on_round: called after every round with the plan so far.
    """
    cfg.validate()
    spec.validate()
    bits = cfg.allowed_bits()
    probe = allocatable_layers(quantize_model(make_fp().eval(), spec), cfg)
    if not probe:
        raise FimaqError("the model has no layers to allocate bits to")
    names = list(probe)
    types = {n: role for n, (_, role) in probe.items()}
    sizes = [probe[n][0].weight.numel() for n in names]
    errors = np.array([quantization_errors(probe[n][0].weight, bits) for n in names])
    unknown = set(cfg.layer_bits) - set(names)
    if unknown:
        raise FimaqError(f"layer_bits names layers that are not allocated: {sorted(unknown)}")
    allowed = np.array([[b in cfg.allowed_bits(n) for b in bits] for n in names])
    check_budget(cfg.budget, sizes, bits, allowed)  # before any calibration
    targets = soft_targets(make_fp().eval(), images, cfg.temperature, calib.batch_size)
    within = [b for b in bits if b <= cfg.budget]
    start = max(within) if within else bits[0]
    current = {n: min(max(start, min(cfg.allowed_bits(n))), max(cfg.allowed_bits(n))) for n in names}
    fisher_images = images[: cfg.num_images] if cfg.num_images else images
    history: list[dict[str, int]] = []
    plan: BitPlan | None = None
    for r in range(cfg.rounds):
        overrides = {**spec.overrides, **{n: {"w_bits": b} for n, b in current.items()}}
        net = quantize_model(make_fp().eval(), dataclasses.replace(spec, overrides=overrides))
        calibrate_model(net, images, calib, progress=progress)  # leaves the quantizers on
        layers = {n: m for n, (m, _) in allocatable_layers(net, cfg).items()}
        traces = fisher_traces(
            net,
            layers,
            fisher_images,
            targets=targets[: fisher_images.shape[0]],
            micro_batch=cfg.micro_batch,
            temperature=cfg.temperature,
        )
        omega = type_normalise(traces, types, cfg.normalise)
        cost = np.array([omega[n] for n in names])[:, None] * errors
        choice = solve_allocation(cost, sizes, bits, cfg.budget, allowed)
        new = dict(zip(names, choice, strict=True))
        history.append(new)
        avg = float(np.dot(choice, sizes) / sum(sizes))
        plan = BitPlan(
            arch=arch,
            model_kwargs=dict(model_kwargs),
            budget=float(cfg.budget),
            layers={
                n: {"w_bits": b, "a_bits": spec.bits_for(n, "head" if types[n] == "head" else "linear")[1]}
                for n, b in new.items()
            },
            sensitivity=omega,
            average_w_bits=avg,
            rounds=list(history),
        )
        changed = sum(new[n] != current[n] for n in names)
        log.info("bit allocation round %d: average %.3f weight bits, %d layers changed", r, avg, changed)
        if on_round is not None:
            on_round(r, plan)
        if new == current:
            break
        current = new
    assert plan is not None
    return plan
