"""What the scripts that train fimaq's shipped float models share: the recipe (AdamW without decay on
biases, norms and embeddings, a one-cycle schedule, label smoothing, gradient clipping), one epoch of
the seeded loop, evaluation, and writing the safetensors checkpoint with its JSON card.

The scripts import it from their own folder (``python scripts/train_*.py`` puts ``scripts/`` first on
the path).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_repo_importable() -> None:
    """Let a script run from a source checkout without installing the package."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def add_recipe_args(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every training script has (``out``: the default checkpoint path)."""
    parser.add_argument("--out", type=Path, default=out, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the shuffle and dropout")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")


def check_out_path(out: Path) -> None:
    """Refuse an output path that is not a ``.safetensors`` file."""
    from fimaq.errors import FimaqError

    if out.suffix != ".safetensors":
        raise FimaqError(f"--out must end in .safetensors, got {out}")


def seed_everything(args: argparse.Namespace) -> None:
    """Threads, the global seed and deterministic algorithms, as every training run sets them."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into a decayed group (weight matrices) and an undecayed one.

    Biases, norm weights, the position embedding and the class token are not decayed.

    Args:
        model: The model to optimise.
        weight_decay: Decay of the weight-matrix group.

    Returns:
        Parameter groups for ``torch.optim.AdamW``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        plain_weight = param.ndim > 1 and "pos_embed" not in name and "token" not in name
        (decay if plain_weight else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Recipe:
    """AdamW with a one-cycle schedule (15% warm-up) and label-smoothed cross-entropy, over
    ``steps_per_epoch`` minibatches of ``num_train`` shuffled images per epoch."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, num_train: int, epochs: int) -> None:
        self.model, self.batch_size = model, args.batch_size
        self.steps_per_epoch = (num_train + args.batch_size - 1) // args.batch_size
        self.optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=args.lr,
            epochs=epochs,
            steps_per_epoch=self.steps_per_epoch,
            pct_start=0.15,
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def epoch(self, images: Tensor, labels: Tensor, order: Tensor) -> float:
        """One epoch over ``images`` in ``order`` (gradients clipped to norm 1); the mean loss."""
        total_loss, seen = 0.0, 0
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            loss = self.criterion(self.model(images[idx]), labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
        return total_loss / seen

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def card(self, args: argparse.Namespace) -> dict[str, Any]:
        """The optimizer's entry of a model card."""
        return {
            "name": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": "OneCycleLR",
            "batch_size": args.batch_size,
            "label_smoothing": args.label_smoothing,
        }


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` on a tensor data set.

    Args:
        model: Classifier returning logits.
        images: Input batch of shape ``(N, C, H, W)``.
        labels: Integer class labels of shape ``(N,)``.
        batch_size: Evaluation chunk size.

    Returns:
        Top-1 accuracy in ``[0, 100]``.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(images)


def run_epochs(
    recipe: Recipe,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    epochs: int,
    seed: int,
    eval_every: int = 1,
) -> tuple[float, dict[int, float], float]:
    """The seeded loop over fixed training tensors: a fresh shuffle per epoch, one ``recipe.epoch``,
    validation every ``eval_every`` epochs and after the last (one printed line each).

    Returns:
        The last validation top-1, ``{epoch: top-1}`` of every validation, and the loop's seconds.
    """
    shuffle_gen = torch.Generator().manual_seed(seed)
    start_time = time.perf_counter()
    val_top1, history = 0.0, {}
    recipe.model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train[0]), generator=shuffle_gen)
        loss = recipe.epoch(*train, order)
        if epoch % eval_every == 0 or epoch == epochs:
            val_top1 = evaluate(recipe.model, *val)
            history[epoch] = round(val_top1, 4)
            print(
                f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}  val top-1 {val_top1:.2f}%  "
                f"lr {recipe.lr:.2e}  {elapsed(start_time):.0f}s",
                flush=True,
            )
    return val_top1, history, elapsed(start_time)


def save_checkpoint(
    model: nn.Module,
    out: Path,
    arch: str,
    model_kwargs: dict[str, Any],
    val: tuple[Tensor, Tensor],
    val_top1: float,
) -> None:
    """Write ``model`` as a float32 safetensors state dict (timm key names, arch in the metadata) and
    check that the file, loaded as fimaq loads it, scores ``val_top1`` on ``val`` again."""
    from safetensors.torch import save_file

    from fimaq.errors import FimaqError
    from fimaq.files import atomic_write_bytes
    from fimaq.models import create_fp_model

    model.eval()
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "model_kwargs": json.dumps(model_kwargs)}
    atomic_write_bytes(out, lambda tmp: save_file(state, tmp, metadata=meta))
    reloaded = create_fp_model(arch, str(out), model_kwargs=model_kwargs)
    check_top1 = evaluate(reloaded, *val)
    if abs(check_top1 - val_top1) > 1e-9:
        raise FimaqError(f"reloaded checkpoint scores {check_top1:.2f}% instead of {val_top1:.2f}%")


def command_line() -> str:
    """The command that ran this script, relative to the repository, for the model card."""
    script = sys.argv[0]
    try:
        script = str(Path(script).resolve().relative_to(REPO_ROOT))
    except ValueError:
        pass
    return "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def write_card(out: Path, card: dict[str, Any], val_top1: float) -> Path:
    """Write the JSON card next to the checkpoint ``out``; say where both are."""
    from fimaq.files import atomic_write_bytes

    card_path = out.with_suffix(".json")
    text = json.dumps(card, indent=2) + "\n"
    atomic_write_bytes(card_path, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out} and {card_path}: val top-1 {val_top1:.2f}%", flush=True)
    return card_path


def elapsed(start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter``)."""
    return time.perf_counter() - start
