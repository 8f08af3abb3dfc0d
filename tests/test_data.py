"""Tests of fimaq.data: the digits recipe (checksums), ImageNet-style folders and the embedded model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.data import DigitsDataModule, ImageNetDataModule
from fimaq.errors import FimaqError

ASSETS = Path(fimaq.__file__).resolve().parent / "assets"
EMBEDDED = ASSETS / "digits_deit_tiny.safetensors"
EMBEDDED_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}
TINY_ARCH = "deit_tiny_patch16_224"


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup()
    return dm


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_splits(digits: DigitsDataModule) -> None:
    train_x, train_y = digits.train_tensors()
    val_x, val_y = digits.val_tensors()
    calib_x, calib_y = digits.calibration_tensors()
    recon_x, recon_y = digits.reconstruction_tensors()
    assert train_x.shape == (1347, 3, 32, 32) and train_y.shape == (1347,)
    assert val_x.shape == (450, 3, 32, 32) and val_y.shape == (450,)
    assert calib_x.shape == (128, 3, 32, 32) and recon_x.shape == (1024, 3, 32, 32)
    assert calib_x.dtype == torch.float32 and val_y.dtype == torch.int64
    assert float(train_x.min()) >= -1.0 and float(train_x.max()) <= 1.0
    assert sorted(val_y.unique().tolist()) == list(range(10))
    assert len(digits.val_dataloader().dataset) == 450
    assert len(digits.test_dataloader().dataset) == 450
    assert len(digits.calib_dataloader().dataset) == 128
    assert len(digits.recon_dataloader().dataset) == 1024


def test_digits_reference_checksums(digits: DigitsDataModule) -> None:
    assert _sha256(digits.calibration_tensors()[0]) == (
        "cdce51fcbd2dc98699ae1b7551f0390e4ded150a2955824b32ae07354bc2910d"
    )
    assert (
        _sha256(digits.val_tensors()[0]) == "85db8cf16ed083af31709d19deb02dc03c25cba8838f045e4c5594200d13bb0d"
    )
    assert _sha256(digits.reconstruction_tensors()[0]) == (
        "1c2e23fb7d9969a3d11592a8c5e1273c7c8927394a8e31523bb83cc725cc8c38"
    )
    assert (
        _sha256(digits.train_tensors()[0])
        == "f1314119b62ec2286002c0f225a5e12ad8e26a07da157a2269f9ecb9c9cb0424"
    )
    assert _sha256(digits.val_tensors()[1].to(torch.int64)) == (
        "13be8853154ebc0106e55e8059501b61982d9cb7e572c2bc1918f69a3dfcfd79"
    )


def test_digits_calib_is_prefix_of_recon(digits: DigitsDataModule) -> None:
    calib_x, calib_y = digits.calibration_tensors()
    recon_x, recon_y = digits.reconstruction_tensors()
    assert torch.equal(calib_x, recon_x[:128]) and torch.equal(calib_y, recon_y[:128])
    first = next(iter(digits.calib_dataloader()))
    assert torch.equal(first[0], calib_x[:32])


def test_digits_setup_is_idempotent(digits: DigitsDataModule) -> None:
    before = digits.calibration_tensors()[0]
    digits.setup("fit")
    assert digits.calibration_tensors()[0] is before


def test_digits_seeded_train_loader(digits: DigitsDataModule) -> None:
    first_a = next(iter(digits.train_dataloader()))
    first_b = next(iter(DigitsDataModule(seed=digits.seed).train_dataloader()))
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    assert not torch.equal(first_a[0], digits.train_tensors()[0][:32])  # shuffled


def test_digits_small_variants() -> None:
    dm = DigitsDataModule(img_size=8, in_chans=1, calib_size=5, recon_size=7)
    x, _ = dm.calibration_tensors()
    assert x.shape == (5, 1, 8, 8)
    assert dm.reconstruction_tensors()[0].shape == (7, 1, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calib_size": 0}, "calib_size"),
        ({"calib_size": 2000}, "calib_size"),
        ({"recon_size": 1348}, "recon_size"),
        ({"img_size": 4}, "img_size"),
        ({"in_chans": 2}, "in_chans"),
    ],
)
def test_digits_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(FimaqError, match=match):
        DigitsDataModule(**kwargs)


# -------------------------------------------------------------------------------------------- imagenet


def _make_tree(root: Path, per_class: int = 3, size: int = 40) -> Path:
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    return _make_tree(tmp_path / "imagenet")


def _tiny_module(root: Path, **kwargs: object) -> ImageNetDataModule:
    options: dict = {
        "arch": TINY_ARCH,
        "model_kwargs": {"img_size": 32},
        "calib_size": 4,
        "recon_size": 5,
        "batch_size": 2,
        "val_batch_size": 4,
        "num_workers": 0,
    }
    options.update(kwargs)
    return ImageNetDataModule(str(root), **options)


def test_imagenet_calibration_tensors_reproducible(tiny_tree: Path) -> None:
    dm = _tiny_module(tiny_tree)
    assert dm.data_config["input_size"] == (3, 32, 32)
    images, labels = dm.calibration_tensors()
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert dm.calibration_tensors()[0] is images  # cached
    torch.manual_seed(123)
    other = _tiny_module(tiny_tree)
    again, again_labels = other.calibration_tensors()
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    recon, _ = other.reconstruction_tensors()
    assert recon.shape == (5, 3, 32, 32)
    assert torch.equal(recon[:4], images)


def test_imagenet_materialising_keeps_global_rng(tiny_tree: Path) -> None:
    dm = _tiny_module(tiny_tree)
    dm.setup()
    state = torch.get_rng_state()
    dm.calibration_tensors()
    assert torch.equal(state, torch.get_rng_state())


def test_imagenet_val_loader_eval_transform(tiny_tree: Path) -> None:
    dm = _tiny_module(tiny_tree)
    batches = list(dm.val_dataloader())
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (6, 3, 32, 32)
    eval_tf = dm.eval_transform()
    first_path = dm._val_set.samples[0][0]
    with Image.open(first_path) as img:
        expected = eval_tf(img.convert("RGB"))
    assert torch.allclose(images[0], expected)
    assert torch.equal(images, torch.cat([b[0] for b in dm.val_dataloader()]))  # deterministic


def test_imagenet_val_limit(tiny_tree: Path) -> None:
    dm = _tiny_module(tiny_tree, val_limit=3)
    assert len(dm.val_dataloader().dataset) == 3


def test_imagenet_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FimaqError, match="not found"):
        _tiny_module(tmp_path / "nope")


def test_imagenet_root_without_splits(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FimaqError, match="lacks the val folder"):
        _tiny_module(tmp_path)


def test_imagenet_split_without_images(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(FimaqError, match="no images"):
        _tiny_module(tmp_path).setup()


def test_imagenet_corrupt_image(tiny_tree: Path) -> None:
    bad = tiny_tree / "val" / "cat" / "img0.png"
    bad.write_bytes(b"this is not a png at all")
    dm = _tiny_module(tiny_tree)
    with pytest.raises(FimaqError, match="img0.png") as info:
        list(dm.val_dataloader())
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"calib_size": 0}, "calib_size"), ({"recon_size": -3}, "recon_size")]
)
def test_imagenet_bad_sizes(tiny_tree: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(FimaqError, match=match):
        _tiny_module(tiny_tree, **kwargs)


def test_imagenet_calib_size_larger_than_train(tiny_tree: Path) -> None:
    with pytest.raises(FimaqError, match="calib_size=50 exceeds"):
        _tiny_module(tiny_tree, calib_size=50).setup()


def test_imagenet_unknown_arch(tiny_tree: Path) -> None:
    with pytest.raises(FimaqError, match="unknown arch"):
        _tiny_module(tiny_tree, arch="not_a_model_xyz")


# ------------------------------------------------------------------------------------- embedded model


@pytest.mark.skipif(not EMBEDDED.is_file(), reason=f"embedded checkpoint {EMBEDDED.name} not trained yet")
def test_embedded_checkpoint_accuracy(digits: DigitsDataModule) -> None:
    from fimaq.models import create_fp_model

    card = json.loads(EMBEDDED.with_suffix(".json").read_text())
    assert card["arch"] == TINY_ARCH and card["model_kwargs"] == EMBEDDED_KWARGS
    model = create_fp_model(TINY_ARCH, str(EMBEDDED), model_kwargs=EMBEDDED_KWARGS)
    images, labels = digits.val_tensors()
    with torch.no_grad():
        top1 = 100.0 * float((model(images).argmax(1) == labels).float().mean())
    assert top1 >= 90.0, f"embedded model reaches only {top1:.2f}% top-1"
    assert abs(top1 - card["val_top1"]) < 0.5
