"""Train the small float DeiT that fimaq ships as its offline default model (scikit-learn digits).

The model is timm's ``deit_tiny_patch16_224`` shrunk to 32x32 inputs, 4x4 patches and 4 blocks
(embed 192, 3 heads, 65 tokens, about 1.8M parameters). Training is a plain, seeded PyTorch loop on
the :class:`fimaq.data.DigitsDataModule` training split without augmentation: AdamW with a one-cycle
learning-rate schedule. The result is written as a float32 safetensors state dict with timm key names
plus a JSON card next to it.

Example:
    PYTHONPATH=. python scripts/train_digits.py --epochs 60
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

ARCH = "deit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}
DEFAULT_OUT = REPO_ROOT / "fimaq" / "assets" / "digits_deit_tiny.safetensors"

log = logging.getLogger("train_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="training epochs")
    add_recipe_args(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the model, write the safetensors file and its JSON card.

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

    if args.epochs < 1:
        raise FimaqError(f"--epochs must be at least 1, got {args.epochs}")
    check_out_path(args.out)
    seed_everything(args)

    dm = DigitsDataModule()
    dm.setup()
    train_x, train_y = dm.train_tensors()
    val_x, val_y = dm.val_tensors()

    model = create_fp_model(ARCH, model_kwargs=MODEL_KWARGS)  # random init (logs a warning saying so)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s %s: %.2fM parameters", ARCH, MODEL_KWARGS, n_params / 1e6)

    recipe = Recipe(model, args, len(train_x), args.epochs)
    val_top1, _, seconds = run_epochs(recipe, (train_x, train_y), (val_x, val_y), args.epochs, args.seed)

    save_checkpoint(model, args.out, ARCH, MODEL_KWARGS, (val_x, val_y), val_top1)
    card = {
        "arch": ARCH,
        "model_kwargs": MODEL_KWARGS,
        "val_top1": round(val_top1, 4),
        "epochs": args.epochs,
        "seed": args.seed,
        "command": command_line(),
        "train_seconds": round(seconds, 1),
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
