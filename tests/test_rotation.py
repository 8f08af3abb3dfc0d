"""Hadamard rotation: the float function is unchanged, the option composes with the whole pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VIT, tiny_model

import fimaq
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec, ReconConfig
from fimaq.errors import FimaqError
from fimaq.export import export_quantized
from fimaq.layers.mode import quant_mode
from fimaq.models.rotation import OnlineRotation, RMSLayerNorm, block_hadamard, rotate_model
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model


def test_block_hadamard_is_orthogonal_with_hadamard_blocks():
    q = block_hadamard(192)
    assert torch.allclose(q @ q.T, torch.eye(192, dtype=torch.float64), atol=1e-12)
    # every entry of a 64-block is +-1/8, and blocks do not mix
    assert torch.allclose(q[:64, :64].abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64))
    assert q[:64, 64:].abs().max() == 0
    assert torch.equal(block_hadamard(192), q)  # seeded


def _perturbed(arch, **kwargs):
    import timm

    torch.manual_seed(0)
    net = timm.create_model(arch, img_size=32, patch_size=4, depth=2, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():  # non-trivial norms, biases and layer scales
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("deit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True}),
        ("vit_small_patch16_224", {"init_values": 0.1}),  # layer scales
    ],
)
def test_rotated_float_model_equals_timm(arch, kwargs):
    net = _perturbed(arch, **kwargs)
    rotated = rotate_model(copy.deepcopy(net))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = net(x), rotated(x)
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())
    assert isinstance(rotated.blocks[0].norm1, RMSLayerNorm) and isinstance(
        rotated.blocks[0].mlp.norm, OnlineRotation
    )
    assert not torch.allclose(rotated.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)


def test_rotation_refuses_swin_in_one_line():
    with pytest.raises(FimaqError) as err:
        quantize_model(tiny_model("swin"), QuantSpec(rotation="hadamard"))
    assert "\n" not in str(err.value) and "SwinTransformer" in str(err.value)
    with pytest.raises(FimaqError, match="rotation"):
        QuantSpec(rotation="givens").validate()


def test_rotation_composes_with_calibration_reconstruction_and_both_exports(tmp_path):
    spec = QuantSpec(w_bits=4, a_bits=4, rotation="hadamard")
    net = quantize_model(tiny_model("vit"), spec)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), quant_mode(net, enabled=False):
        fp = net(images)
        assert torch.allclose(fp, tiny_model("vit")(images), atol=1e-4)
    calibrate_model(net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=1), progress=False)
    reconstruct_model(net, images, ReconConfig(iters=4, loss="mse", batch_size=8), progress=False)
    meta = {
        "arch": TINY_VIT[0],
        "model_kwargs": TINY_VIT[1],
        "quant": {"w_bits": 4, "a_bits": 4, "rotation": "hadamard"},
    }
    path = tmp_path / "rotated.safetensors"
    export_quantized(net, meta, path, check_input=images[:2])
    loaded = fimaq.load_quantized(path)
    assert isinstance(loaded.blocks[0].mlp.norm, OnlineRotation)
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))
    pytest.importorskip("onnxruntime")
    from fimaq.export_onnx import export_onnx

    result = export_onnx(net, tmp_path / "rotated.onnx", images[:2], check_input=images)
    assert result["parity"] is not None


def test_rotation_composes_with_the_mixed_precision_search():
    from fimaq.config import MixedPrecisionConfig
    from fimaq.mixed_precision import search_bit_plan

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = MixedPrecisionConfig(budget=3.5, rounds=1, micro_batch=4)  # between two bit-widths: a mix
    calib = CalibConfig(num_images=8, eq_n=32, search_rounds=1)
    spec = QuantSpec(w_bits=3, a_bits=4, rotation="hadamard")
    plan = search_bit_plan(lambda: tiny_model("vit"), spec, images, cfg, calib, "tiny", {}, False)
    assert plan.average_w_bits <= 3.5 + 1e-9 and len(set(v["w_bits"] for v in plan.layers.values())) > 1


def test_online_rotation_applies_a_block_diagonal_matrix_block_by_block():
    q = block_hadamard(48, seed=3)  # 3 blocks of 16
    rot = OnlineRotation(q)
    assert rot.block == 16
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rot(x).double(), x.double() @ q, rtol=0, atol=1e-5)
    dense = q.clone()
    dense[0, 20] = 0.5  # no longer block-diagonal: one product of all columns
    full = OnlineRotation(dense)
    assert full.block == 48
    torch.testing.assert_close(full(x).double(), x.double() @ dense, rtol=0, atol=1e-5)
