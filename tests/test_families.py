"""Every registered family beyond the tiny ViT and Swin: the ViT variants timm ships keep their float
function and calibrate close to it; each new family allocates bits (LampQ), exports (integer codes that
reload identically, ONNX that onnxruntime matches), and calibrates from its shipped configs on the
command line; a model of no registered family is refused by name."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import _SMALL, TINY_FAMILIES, tiny_model
from family_checks import CALIB, images, relative_error

from fimaq.calib import calibrate_model
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import CalibConfig, MixedPrecisionConfig, QuantSpec
from fimaq.errors import FimaqError
from fimaq.models import create_fp_model, quantize_model

ROOT = Path(__file__).resolve().parents[1]

#: the variants of timm's VisionTransformer that needed no family of their own, small
VIT_VARIANTS = {
    "deit3 (LayerScale)": ("deit3_small_patch16_224", dict(_SMALL)),
    "dinov2": ("vit_small_patch14_dinov2", dict(_SMALL)),
    "clip (pre-norm)": ("vit_base_patch16_clip_224", dict(_SMALL)),
    "flexivit": ("flexivit_small", dict(_SMALL)),
    "deit distilled": ("deit_tiny_distilled_patch16_224", dict(_SMALL)),
    "qk_norm": ("vit_small_patch16_224", dict(_SMALL, qk_norm=True)),
    "register tokens": ("vit_small_patch16_224", dict(_SMALL, reg_tokens=4)),
    "average pooling": (
        "vit_small_patch16_224",
        dict(_SMALL, class_token=False, global_pool="avg", fc_norm=True),
    ),
}
#: relative squared logit error after W8/A8 calibration on 32 random images (random weights; measured
#: 0.0006-0.011 over the variants, register tokens the largest)
W8A8_BOUND = 0.03


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
def test_vit_variants_keep_the_float_function_and_calibrate_close(variant):
    import timm

    arch, kwargs = VIT_VARIANTS[variant]
    torch.manual_seed(0)
    fp = timm.create_model(arch, **kwargs).eval()
    size = fp.patch_embed.img_size
    x = images(16, size, seed=2)
    net = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=8, a_bits=8))
    with torch.no_grad():
        assert torch.equal(net(x), fp(x))  # quantizers start off
    calibrate_model(net, images(32, size, seed=1), CALIB, progress=False)
    error = relative_error(net, fp, x)
    assert 0 < error < W8A8_BOUND, error


def _family_model(key: str):
    fp = tiny_model(key)
    return fp, fp.patch_embed.img_size


@pytest.mark.parametrize("key", sorted(TINY_FAMILIES))
def test_search_bits_allocates_within_the_budget(key):
    from fimaq.mixed_precision import search_bit_plan

    _, size = _family_model(key)
    cfg = MixedPrecisionConfig(budget=3.0, rounds=1, micro_batch=4)
    calib = CalibConfig(num_images=8, eq_n=32, search_rounds=1)
    spec = QuantSpec(w_bits=3, a_bits=4)
    plan = search_bit_plan(lambda: tiny_model(key), spec, images(8, size, 0), cfg, calib, key, {}, False)
    bits = {layer["w_bits"] for layer in plan.layers.values()}
    assert plan.average_w_bits <= 3.0 + 1e-9 and bits <= set(cfg.candidates), plan.layers


@pytest.mark.parametrize("key", sorted(TINY_FAMILIES))
def test_export_reloads_identically_and_onnx_matches(key, tmp_path, monkeypatch):
    from fimaq.export import export_quantized
    from fimaq.export_onnx import export_onnx

    fp, size = _family_model(key)
    head = fp.get_classifier()
    with torch.no_grad():  # timm initialises some heads tiny: logits ~1e-4 apart would tie in argmax
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    arch, kwargs = TINY_FAMILIES[key]
    spec = QuantSpec(w_bits=4, a_bits=4)
    net = quantize_model(fp, spec)
    x = images(8, size, seed=1)
    minmax_calibrate(net, x)
    quant = {"w_bits": 4, "a_bits": 4, "head_a_bits": spec.head_a_bits, "overrides": {}}
    meta = {"arch": arch, "model_kwargs": kwargs, "quant": quant}
    info = export_quantized(net, meta, tmp_path / "export.safetensors", check_input=x)
    assert Path(info["path"]).is_file()
    res = export_onnx(net, tmp_path / "model.onnx", x[:2], check_input=x)
    assert res["parity"]["ok"], res["parity"]


CONFIG_MODELS = {  # shipped config -> the tiny model of its family
    "swinv2_tiny": "swinv2",
    "eva02_small": "eva02",
    "beit_base": "beit",
    "cait_s24": "cait",
}


@pytest.mark.parametrize("bits", ["w3a3", "w4a4"])
@pytest.mark.parametrize("config", sorted(CONFIG_MODELS))
def test_main_calibrate_on_each_family_config_from_an_image_folder(config, bits, tmp_path, monkeypatch):
    from test_user_model import FAST, _image_folder

    from fimaq.cli import main

    path = ROOT / "configs" / "imagenet" / f"{config}_{bits}.yaml"
    assert path.is_file(), path
    kwargs = dict(TINY_FAMILIES[CONFIG_MODELS[config]][1], num_classes=2)
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    main(
        [
            "calibrate",
            "-c",
            str(path),
            f"--data.init_args.root={_image_folder(tmp_path / 'data')}",
            "--model.checkpoint_path=null",
            f"--model.model_kwargs={yaml.safe_dump(kwargs, default_flow_style=True).strip()}",
            f"--trainer.default_root_dir={run}",
            *FAST,
        ]
    )
    assert (run / "calibrated.safetensors").is_file()


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])
def test_a_model_of_no_registered_family_is_refused_by_name(arch):
    with pytest.raises(FimaqError, match=f"arch '{arch}' .* no registered transformer block"):
        create_fp_model(arch)


@pytest.mark.parametrize("key", sorted(TINY_FAMILIES))
def test_hadamard_rotation_is_refused_by_the_family_name(key):
    model = tiny_model(key)
    with pytest.raises(FimaqError, match=f"ViT/DeiT .* only \\({type(model).__name__}\\)"):
        quantize_model(model, QuantSpec(w_bits=4, a_bits=4, rotation="hadamard"))


@pytest.mark.parametrize("family", ["eva02", "swinv2"])
def test_held_out_checkpoints_reach_their_floor_and_low_bit_calibration_costs_accuracy(family):
    """The shipped held-out models (scripts/train_family.py): the card's arch and kwargs build them,
    float top-1 on the 450 validation digits at its floor (measured 98.67 / 99.56), and W2/A3
    calibration alone (32 images here) more than a point below float."""
    import json

    from fimaq.artifacts import resolve_checkpoint
    from fimaq.data import DigitsDataModule

    path = resolve_checkpoint(f"embedded:digits_{family}")
    card = json.loads(Path(path).with_suffix(".json").read_text())
    fp = create_fp_model(card["arch"], path, model_kwargs=card["model_kwargs"])
    dm = DigitsDataModule(model_kwargs=card["model_kwargs"])
    dm.setup()
    xv, yv = dm.val_tensors()

    def top1(net) -> float:
        with torch.no_grad():
            return 100.0 * float((net(xv).argmax(-1) == yv).float().mean())

    fp_top1 = top1(fp)
    assert fp_top1 >= 98.0, fp_top1
    net = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=2, a_bits=3))
    calibrate_model(
        net, dm.calibration_tensors()[0][:32], CalibConfig(num_images=32, search_rounds=1), progress=False
    )
    assert top1(net) < fp_top1 - 1.0


def test_an_unregistered_attention_inside_a_block_is_named_in_a_warning(caplog):
    """EVA with ``attn_type="rope"`` uses timm's ``AttentionRope``, which fimaq does not register: its
    linears are swapped, its products stay float, and quantize_model says so (the default EVA does not)."""
    import timm

    arch, kwargs = TINY_FAMILIES["eva02"]
    with caplog.at_level("WARNING", logger="fimaq.models.swap"):
        quantize_model(tiny_model("eva02"), QuantSpec(w_bits=4, a_bits=4))
        assert "attention product" not in caplog.text
        quantize_model(
            timm.create_model(arch, **kwargs, attn_type="rope").eval(), QuantSpec(w_bits=4, a_bits=4)
        )
    assert "2 of 2 blocks (blocks.0, ...) hold no quantized attention product" in caplog.text
    assert "(AttentionRope) is not a registered type" in caplog.text
