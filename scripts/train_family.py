"""Train a small float model of a timm family beyond ViT/DeiT on scikit-learn's digits (held-out check).

Two families, each shrunk to the 32x32 digits of :class:`fimaq.data.DigitsDataModule` (10 classes):

* ``eva02``: timm's ``eva02_tiny_patch14_224`` with 4x4 patches (64 patches + a class token), 4 blocks,
  embed 96, 3 heads, the rotary position embedding on an 8x8 reference grid and the model's own
  SwiGLU MLP (a packed ``GluMlp``), about 0.46M parameters.
* ``swinv2``: timm's ``swinv2_tiny_window8_256`` with 2x2 patches (a 16x16 map), window 4 (it divides
  the 16x16 and the 8x8 maps of both stages), two stages of 2 blocks, embed 48, heads 3 and 6, about
  0.32M parameters.

Training is the recipe of ``scripts/train_digits.py`` (:mod:`_training`): a plain, seeded PyTorch loop
on the training split without augmentation, AdamW with a one-cycle learning-rate schedule. The result
is written as a float32 safetensors state dict with timm key names plus a JSON card next to it;
``--out`` defaults to ``fimaq/assets/digits_<family>.safetensors`` (checkpoint
``embedded:digits_<family>``).

Example:
    PYTHONPATH=. python scripts/train_family.py --family eva02 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from _training import (
    REPO_ROOT,
    Recipe,
    add_recipe_args,
    check_out_path,
    command_line,
    ensure_repo_importable,
    run_epochs,
    save_checkpoint,
    seed_everything,
    write_card,
)

# Lists, not tuples: the kwargs go through JSON (checkpoint metadata, card) unchanged.
FAMILIES: dict[str, dict[str, Any]] = {
    "eva02": {
        "arch": "eva02_tiny_patch14_224",
        "model_kwargs": {
            "img_size": 32,
            "patch_size": 4,
            "depth": 4,
            "embed_dim": 96,
            "num_heads": 3,
            "num_classes": 10,
            "ref_feat_shape": [8, 8],
        },
        "epochs": 60,
    },
    "swinv2": {
        "arch": "swinv2_tiny_window8_256",
        "model_kwargs": {
            "img_size": 32,
            "patch_size": 2,
            "window_size": 4,
            "depths": [2, 2],
            "num_heads": [3, 6],
            "embed_dim": 48,
            "num_classes": 10,
        },
        "epochs": 50,
    },
}

log = logging.getLogger("train_family")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options (``epochs`` and ``out`` filled in from the family when not given).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True, help="model family")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the family's)")
    parser.add_argument("--eval-every", type=int, default=1, help="validate every this many epochs")
    add_recipe_args(parser, None)  # type: ignore[arg-type]  (the default depends on --family)
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = FAMILIES[args.family]["epochs"]
    if args.out is None:
        args.out = REPO_ROOT / "fimaq" / "assets" / f"digits_{args.family}.safetensors"
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the family's model, write the safetensors file and its JSON card.

    Args:
        args: Options from :func:`parse_args`.

    Returns:
        The JSON card that was written.
    """
    ensure_repo_importable()
    import fimaq  # noqa: F401  (torchvision shim before timm)
    from fimaq.data import DigitsDataModule
    from fimaq.errors import FimaqError
    from fimaq.models import create_fp_model

    if args.epochs < 1 or args.eval_every < 1:
        raise FimaqError(
            f"--epochs and --eval-every must be at least 1, got {args.epochs}, {args.eval_every}"
        )
    check_out_path(args.out)
    seed_everything(args)
    arch, model_kwargs = FAMILIES[args.family]["arch"], FAMILIES[args.family]["model_kwargs"]

    dm = DigitsDataModule()
    dm.setup()
    train_x, train_y = dm.train_tensors()
    val_x, val_y = dm.val_tensors()

    model = create_fp_model(arch, model_kwargs=model_kwargs)  # random init (logs a warning saying so)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s %s: %.2fM parameters", arch, model_kwargs, n_params / 1e6)

    recipe = Recipe(model, args, len(train_x), args.epochs)
    train, val = (train_x, train_y), (val_x, val_y)
    val_top1, history, train_seconds = run_epochs(recipe, train, val, args.epochs, args.seed, args.eval_every)

    save_checkpoint(model, args.out, arch, model_kwargs, (val_x, val_y), val_top1)
    card = {
        "arch": arch,
        "model_kwargs": model_kwargs,
        "family": args.family,
        "parameters": n_params,
        "val_top1": round(val_top1, 4),
        "val_top1_history": history,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "command": command_line(),
        "train_seconds": round(train_seconds, 1),
        "optimizer": recipe.card(args),
        "data": "fimaq.data.DigitsDataModule() defaults: 1347 train / 450 val",
    }
    write_card(args.out, card, val_top1)
    return card


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments and train.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        Process exit status.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
