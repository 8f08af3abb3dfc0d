"""A user's own model and data through the command line, as the README shows it: a generated
ImageFolder, a float checkpoint of a timm model with overrides, the ImageNet configs."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fimaq.artifacts import read_artifact
from fimaq.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_command() -> list[str]:
    """The arguments of the README's own-model command (after ``main.py``), as printed there."""
    text = (ROOT / "README.md").read_text().split("## Your own model and data", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    args = shlex.split(block.replace("\\\n", " "))
    return args[args.index("main.py") + 1 :]


def substitute(args: list[str], values: dict[str, str]) -> list[str]:
    """``args`` with the value after each flag in ``values`` replaced."""
    out = list(args)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


FAST = [  # small settings so that the test takes seconds; the rest is the config as shipped
    "--model.calib.num_images=8",
    "--model.calib.search_rounds=1",
    "--data.init_args.calib_size=8",
    "--data.init_args.recon_size=16",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=8",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]
MODELS = {
    "deit": ("deit_tiny_w3a3", "deit_tiny_patch16_224", "{img_size: 32, depth: 2, num_classes: 2}"),
    "swin": (
        "swin_tiny_w3a3",
        "swin_tiny_patch4_window7_224",
        "{img_size: 56, depths: [2, 2], num_heads: [2, 4], embed_dim: 32, num_classes: 2}",
    ),
}


def _image_folder(root: Path) -> Path:
    """train/ and val/ with two classes of random RGB JPEGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def _checkpoint(path: Path, arch: str, kwargs: str) -> Path:
    import timm
    import yaml
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(arch, **yaml.safe_load(kwargs))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_readme_command_names_what_a_user_changes():
    args = readme_command()
    assert args[0] == "calibrate" and args[1] == "-c" and args[2].startswith("configs/imagenet/")
    for flag in ("--data.init_args.root", "--model.checkpoint_path", "--model.model_kwargs"):
        assert flag in args


@pytest.mark.parametrize("which", sorted(MODELS))
def test_own_model_calibrates_and_fits_from_the_imagenet_config(tmp_path, which, monkeypatch):
    config, arch, kwargs = MODELS[which]
    monkeypatch.chdir(ROOT)
    data = _image_folder(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "float.safetensors", arch, kwargs)
    run = tmp_path / "run"
    values = {
        "-c": f"configs/imagenet/{config}.yaml",
        "--data.init_args.root": str(data),
        "--model.checkpoint_path": str(ckpt),
        "--model.model_kwargs": kwargs,
        "--trainer.default_root_dir": str(run),
    }
    command = substitute(readme_command(), values)
    main([*command, f"--model.arch={arch}", *FAST])
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["calibrated_top1"] <= 100
    _, meta = read_artifact(run / "calibrated.safetensors")
    assert meta["arch"] == arch and meta["model_kwargs"]["num_classes"] == 2

    fit = ["fit", *substitute(command, {"--trainer.default_root_dir": str(tmp_path / "fit")})[1:]]
    steps = ["--model.recon.iters=2", "--model.recon.batch_size=4", "--model.fisher.rank=1"]
    main([*fit, f"--model.arch={arch}", *FAST, *steps, "--model.fisher.num_samples=8"])
    state, meta = read_artifact(tmp_path / "fit" / "quantized.safetensors")
    assert meta["stage"] == "reconstructed" and all(torch.isfinite(v).all() for v in state.values())


def test_a_corrupt_image_read_by_a_worker_is_one_line(tmp_path, capsys, monkeypatch):
    config, arch, kwargs = MODELS["deit"]
    monkeypatch.chdir(ROOT)
    data = _image_folder(tmp_path / "data")
    broken = data / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    values = {
        "-c": f"configs/imagenet/{config}.yaml",
        "--data.init_args.root": str(data),
        "--model.checkpoint_path": str(_checkpoint(tmp_path / "float.safetensors", arch, kwargs)),
        "--model.model_kwargs": kwargs,
        "--trainer.default_root_dir": str(tmp_path / "run"),
    }
    every_image = ["--data.init_args.calib_size=25", "--data.init_args.recon_size=25"]
    with pytest.raises(SystemExit) as exc:
        main([*substitute(readme_command(), values), *FAST, *every_image, "--data.init_args.num_workers=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot decode image {broken}: ") and "Traceback" not in "\n".join(err)
