"""Calibration images without data: noise optimised until the float model recognises it (PSAQ-ViT).

For users who have a checkpoint but no images (``--data.synthetic true``; docs/synthetic.md). Every
image starts as seeded Gaussian noise with a target class (balanced over the classes), and Adam
minimises, per chunk of ``batch_size`` images, PSAQ-ViT's objective (Li et al., ECCV 2022)::

    CE(f(x), y) - ENTROPY_WEIGHT * sum over blocks of H(patch similarity)
        + TV_WEIGHT * tv(x) + L2_WEIGHT * mean(x**2)

``H`` is the differential entropy of the cosine similarities between the patch tokens of a block's
output, estimated with a Gaussian kernel density (bandwidth ``KDE_BANDWIDTH``) on ``KDE_POINTS``
points; maximising it spreads the similarities, as in real images, where noise gives near-constant
ones. Unlike PSAQ-ViT, the images are not shifted or flipped at random each step (DeepInversion's
jitter): with tens of steps instead of a thousand, the jitter kept them from fitting their targets.

Chunk ``j`` draws its noise from its own generator (seeded by ``seed`` and ``j``), so the
first rows of a larger set equal a smaller set: the reconstruction images extend the calibration
images. With a ``state_path`` the finished chunks, the current chunk and its Adam state are saved
(safetensors with JSON metadata, never pickle); a later call with the same settings continues from
there, with the result of an uninterrupted run, and returns finished images without any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fimaq.artifacts import read_artifact, resolve_checkpoint, save_quantized
from fimaq.errors import FimaqError, Interrupted, defer_interrupts, require_int

log = logging.getLogger(__name__)

SYNTHETIC_FILE = "synthetic.safetensors"
OBJECTIVE = "psaq-vit/1"  # recorded in the state: another objective never resumes this one
ENTROPY_WEIGHT = 0.1  # PSAQ-ViT's 1.0 outweighs the cross-entropy of tens of steps (docs/synthetic.md)
KDE_BANDWIDTH = 0.01
KDE_POINTS = 10
VIEW_SHIFT = 8  # views: shifted by up to 1/VIEW_SHIFT of the image side
MAX_TOKENS = 256  # patch tokens per block the similarity entropy looks at (a fixed stride beyond)
TV_WEIGHT = 0.05
L2_WEIGHT = 0.01
ADAM_BETAS = (0.5, 0.9)
SAVE_SECONDS = 60.0


def weights_fingerprint(
    arch: str, model_kwargs: Mapping[str, Any], checkpoint: str | None, pretrained: bool | None
) -> dict[str, Any]:
    """What identifies the float weights a synthesis was made from: arch, kwargs and the checkpoint
    (its SHA-256 when it is a file)."""
    found: dict[str, Any] = {"arch": arch, "model_kwargs": dict(model_kwargs or {})}
    found["checkpoint"] = checkpoint or ("pretrained" if pretrained else None)
    path = resolve_checkpoint(checkpoint)
    if path and Path(path).is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found["sha256"] = digest.hexdigest()
    return found


def balanced_labels(num_images: int, num_classes: int, seed: int) -> Tensor:
    """Target classes: the classes in a seeded order, repeated, so that every prefix of the set is as
    balanced as it can be (``classes[arange(n) % num_classes]``)."""
    classes = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return classes[torch.arange(num_images) % num_classes].contiguous()


def shifted_views(images: Tensor, labels: Tensor, num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num_images`` rows: ``images``, then copies of them rolled by seeded offsets (row ``i`` is
    image ``i % len(images)`` shifted by up to ``1/VIEW_SHIFT`` of the side; its own generator, so
    every prefix is the same)."""
    k = images.shape[0]
    if num_images <= k:
        return images[:num_images], labels[:num_images]
    limit = max(1, min(images.shape[-2:]) // VIEW_SHIFT)
    views = []
    for i in range(k, num_images):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        dy, dx = torch.randint(-limit, limit + 1, (2,), generator=gen).tolist()
        views.append(torch.roll(images[i % k], shifts=(dy, dx), dims=(-2, -1)))
    index = torch.arange(k, num_images) % k
    return torch.cat([images, torch.stack(views)]), torch.cat([labels, labels[index]])


def patch_similarity_entropy(tokens: Tensor) -> Tensor:
    """Differential entropy of the pairwise cosine similarities of each image's tokens.

    The density of the ``N(N-1)/2`` similarities is a Gaussian kernel density estimate (bandwidth
    ``KDE_BANDWIDTH``) evaluated on ``KDE_POINTS`` points from their minimum to their maximum, and
    ``-p log p`` is integrated with the trapezoidal rule (PSAQ-ViT's estimator).

    Args:
        tokens: ``(B, N, D)`` patch tokens (N >= 2).

    Returns:
        ``(B,)`` entropies.
    """
    unit = F.normalize(tokens.float(), dim=-1)
    sims = unit @ unit.transpose(1, 2)
    n = sims.shape[-1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=sims.device)
    s = sims[:, rows, cols]
    lo, hi = s.detach().amin(-1, keepdim=True), s.detach().amax(-1, keepdim=True)
    grid = lo + (hi - lo) * torch.linspace(0, 1, KDE_POINTS, device=s.device)
    z = (grid.unsqueeze(-1) - s.unsqueeze(1)) / KDE_BANDWIDTH
    pdf = torch.exp(-0.5 * z.square()).mean(-1) / (KDE_BANDWIDTH * math.sqrt(2 * math.pi)) + 1e-4
    return torch.trapezoid(-pdf * pdf.log(), grid, dim=-1)


def image_prior(x: Tensor) -> Tensor:
    """``TV_WEIGHT`` times the mean squared difference of neighbouring pixels plus ``L2_WEIGHT`` times
    the mean squared pixel, per image: ``(B,)``."""
    tv = (x[..., 1:, :] - x[..., :-1, :]).square().flatten(1).mean(1)
    tv = tv + (x[..., :, 1:] - x[..., :, :-1]).square().flatten(1).mean(1)
    return TV_WEIGHT * tv + L2_WEIGHT * x.square().flatten(1).mean(1)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(in_chans, height, width)`` the model was built for (``patch_embed``)."""
    from fimaq.models.swap import example_input

    c, h, w = example_input(model).shape[1:]
    return int(c), int(h), int(w)


def _patch_tokens(output: Any, prefix: int) -> Tensor | None:
    """A block output as ``(B, N, D)`` patch tokens (prefix tokens dropped, Swin's NHWC maps pooled
    to at most 16x16, long sequences strided to ``MAX_TOKENS``); None if it has fewer than 2."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, Tensor):
        return None
    if out.ndim == 4:  # (B, H, W, C)
        side = math.isqrt(MAX_TOKENS)
        if out.shape[1] * out.shape[2] > MAX_TOKENS:
            out = F.adaptive_avg_pool2d(out.permute(0, 3, 1, 2), side).permute(0, 2, 3, 1)
        out = out.flatten(1, 2)
    elif out.ndim == 3:
        out = out[:, prefix:]
        if out.shape[1] > MAX_TOKENS:
            out = out[:, :: math.ceil(out.shape[1] / MAX_TOKENS)]
    else:
        return None
    return out if out.shape[1] >= 2 else None


@contextmanager
def float_features(model: nn.Module) -> Iterator[list[Tensor]]:
    """The model in eval mode, computing in float (quantizers off) with its parameters frozen; yields
    a list that every forward pass fills with the patch tokens of each transformer block. Hooks, modes
    and ``requires_grad`` flags are restored on exit."""
    from fimaq.layers.mode import quant_mode
    from fimaq.models.registry import find_units

    blocks = [u for u in find_units(model) if u.kind == "block"]
    if not blocks:
        raise FimaqError(f"{type(model).__name__} has no registered transformer block to synthesise images")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    features: list[Tensor] = []

    def hook(has_prefix: bool) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            tokens = _patch_tokens(output, prefix if has_prefix else 0)
            if tokens is not None:
                features.append(tokens)

        return keep

    handles = [u.module.register_forward_hook(hook(u.has_cls_token)) for u in blocks]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with quant_mode(model, enabled=False):
            yield features
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _step(model: nn.Module, x: Tensor, labels: Tensor, features: list[Tensor]) -> Tensor:
    """One forward and backward pass of the objective (gradients land in ``x.grad``); the loss."""
    features.clear()
    logits = model(x)
    entropy = sum(patch_similarity_entropy(t) for t in features)
    features.clear()
    per_image = -ENTROPY_WEIGHT * entropy + image_prior(x)
    loss = F.cross_entropy(logits.float(), labels) + per_image.mean()
    loss.backward()
    return loss.detach()


def _check(
    num_images: int, shape: Sequence[int], num_classes: Any, seed: int, steps: int, lr: float, batch_size: int
) -> None:
    """One FimaqError naming the first bad setting."""
    require_int("synthetic num_images", num_images, 1)
    require_int("synthetic steps", steps, 0)
    require_int("synthetic batch_size", batch_size, 1)
    require_int("synthetic seed", seed, 0)
    require_int("num_classes", num_classes, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise FimaqError(f"synthetic lr must be a positive number, got {lr!r}")
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise FimaqError(f"synthetic image_shape must be (channels, height, width), got {tuple(shape)}")


class _State:
    """The progress of a synthesis: finished chunks, and the current chunk with its Adam state."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.done: list[Tensor] = []  # finished chunks (CPU)
        self.current: Tensor | None = None
        self.adam: dict[str, Tensor] = {}
        self.step = 0

    @classmethod
    def load(cls, path: Path | None, settings: dict[str, Any]) -> _State:
        state = cls(settings)
        if path is None or not path.is_file():
            return state
        try:
            tensors, meta = read_artifact(path)
        except FimaqError as exc:
            log.warning("synthesis state %s is unreadable (%s): starting over", path, exc)
            return state
        if meta.get("synthetic") != settings or "images" not in tensors:
            log.info("%s holds images of other settings: synthesising anew", path)
            return state
        done = tensors["images"]
        size = settings["batch_size"]
        state.done = [done[i : i + size] for i in range(0, done.shape[0], size)]
        state.step = int(meta.get("step", 0))
        if "current" in tensors:
            state.current = tensors["current"]
            state.adam = {k[5:]: v for k, v in tensors.items() if k.startswith("adam.")}
        return state

    def save(self, path: Path) -> None:
        shape = self.settings["image_shape"]
        images = torch.cat(self.done) if self.done else torch.empty(0, *shape)
        tensors = {"images": images}
        if self.current is not None:
            tensors["current"] = self.current
            tensors.update({f"adam.{k}": v for k, v in self.adam.items()})
        save_quantized(path, tensors, {"synthetic": self.settings, "step": self.step})


def synthesize_images(
    model: nn.Module,
    num_images: int,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    steps: int = 20,
    lr: float = 0.5,
    batch_size: int = 32,
    progress: bool = True,
    state_path: str | Path | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    save_seconds: float = SAVE_SECONDS,
    write_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """Images the float ``model`` classifies as their targets, optimised from seeded noise.

    Args:
        model: the float model (a quantized one computes in float here: its quantizers are off). Its
            mode and ``requires_grad`` flags are restored afterwards.
        num_images: images to return (whole chunks of ``batch_size`` are optimised).
        image_shape: ``(channels, height, width)``; default: the model's input (``patch_embed``).
        num_classes: classes the targets are balanced over; default: ``model.num_classes``.
        seed: the noise and the targets; the same seed gives the same images on one machine.
        steps: Adam steps per chunk (cosine learning-rate decay to zero).
        lr: Adam's initial learning rate.
        batch_size: images optimised together (memory; a chunk's result does not depend on others).
        progress: show a progress bar.
        state_path: a safetensors file that keeps the progress (every ``save_seconds``, after every
            chunk, and on an interruption); an existing one of the same settings is continued, and
            its finished images are returned without work.
        fingerprint: what identifies the model (arch, kwargs, weights); part of the settings.
        save_seconds: seconds between saves of the state within a chunk.
        write_state: False: read ``state_path`` but never write it (data-parallel ranks other than 0).

    Returns:
        ``(images, labels)`` on the CPU: float32 ``(num_images, *image_shape)`` and int64 targets.
    """
    shape = tuple(image_shape) if image_shape is not None else input_shape(model)
    classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    _check(num_images, shape, classes, seed, steps, lr, batch_size)
    settings = {  # as JSON gives it back, to compare with a saved state
        "objective": OBJECTIVE,
        "seed": seed,
        "image_shape": list(shape),
        "num_classes": classes,
        "steps": steps,
        "lr": float(lr),
        "batch_size": batch_size,
        "fingerprint": dict(fingerprint or {}),
    }
    settings = json.loads(json.dumps(settings))
    path = Path(state_path) if state_path is not None else None
    state = _State.load(path, settings)
    chunks = math.ceil(num_images / batch_size)
    labels = balanced_labels(chunks * batch_size, classes, seed)
    todo = max(0, chunks - len(state.done))
    if todo:
        _optimise(model, state, labels, chunks, path if write_state else None, progress, save_seconds)
    images = torch.cat(state.done[:chunks])[:num_images].contiguous()
    return images, labels[:num_images].clone()


def _optimise(
    model: nn.Module,
    state: _State,
    labels: Tensor,
    chunks: int,
    path: Path | None,
    progress: bool,
    save_seconds: float,
) -> None:
    """Optimise the chunks ``state`` lacks up to ``chunks``, saving to ``path`` (if given)."""
    cfg = state.settings
    size, steps, shape = cfg["batch_size"], cfg["steps"], tuple(cfg["image_shape"])
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    total = (chunks - len(state.done)) * steps - (state.step if state.current is not None else 0)
    bar = tqdm(total=total, desc="synthesize", disable=not progress, leave=False)
    last_save = time.perf_counter()

    def save(force: bool) -> None:
        nonlocal last_save
        if path is not None and (force or time.perf_counter() - last_save > save_seconds):
            state.save(path)
            last_save = time.perf_counter()

    chunk, step = len(state.done), state.step
    try:
        with bar, torch.enable_grad(), float_features(model) as features:
            while len(state.done) < chunks:
                chunk = len(state.done)
                gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + chunk)
                noise = torch.randn((size, *shape), generator=gen)
                start = noise if state.current is None else state.current
                x = start.to(device=device, dtype=torch.float32).requires_grad_(True)
                y = labels[chunk * size : (chunk + 1) * size].to(device)
                opt = torch.optim.Adam([x], lr=cfg["lr"], betas=ADAM_BETAS)
                if state.current is not None and state.adam:
                    opt.load_state_dict(
                        {"state": {0: dict(state.adam)}, "param_groups": opt.state_dict()["param_groups"]}
                    )
                step = state.step if state.current is not None else 0
                while step < steps:
                    for group in opt.param_groups:
                        group["lr"] = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
                    _step(model, x, y, features)
                    with defer_interrupts():  # an update counts once it is recorded
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        step += 1
                        state.current, state.step = x.detach(), step
                        state.adam = dict(opt.state[x])
                        save(force=False)
                    bar.update()
                with defer_interrupts():
                    state.done.append(x.detach().cpu())
                    state.current, state.adam, state.step = None, {}, 0
                    save(force=True)
    except Interrupted as exc:
        save(force=True)
        exc.where = (
            exc.where or f"while synthesising images (chunk {chunk + 1}/{chunks}, step {step}/{steps})"
        )
        raise
