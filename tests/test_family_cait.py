"""timm CaiT (talking-heads self-attention blocks, then class-attention blocks): the float function is
kept exactly (fused and explicit class attention), the explicit matmul path agrees with timm,
calibration gets close at W8/A8, reconstruction runs with the class-attention blocks outside every
unit, and roles, units, folds and the state dict are what they should be."""

import copy

import pytest
import torch

from fimaq.config import QuantSpec
from fimaq.layers.cait import QuantClassAttn, QuantTalkingHeadAttn
from fimaq.layers.mode import quant_mode
from fimaq.models.swap import iter_qlayers, quantize_model
from tests import family_checks as checks
from tests.conftest import tiny_model

W8A8_BOUND = 0.003  # measured 0.00094 (relative squared logit error on 16 random images; W3/A3: 0.029)
ATTENTIONS = (QuantTalkingHeadAttn, QuantClassAttn)


@pytest.fixture(scope="module", name="fp")
def _float_model() -> torch.nn.Module:
    """The tiny CaiT with LayerScales of about 0.5 (timm's 1e-4 would hide every block's error)."""
    return checks.redraw_parameters(
        tiny_model("cait"), seed=3, rules={("gamma_1", "gamma_2"): lambda z: 0.5 + 0.1 * z}
    )


@pytest.fixture(scope="module")
def calibrated(fp):
    """bits -> the model quantized at W{bits}/A{bits} and calibrated on 32 random images."""
    return {bits: checks.calibrated_copy(fp, bits, checks.images(32, 32, seed=1)) for bits in (8, 3)}


@pytest.mark.parametrize("fused", [True, False])
def test_quantization_off_equals_timm(fp, fused):
    ref = copy.deepcopy(fp)
    switched = checks.set_fused_attn(ref, fused)
    assert len(switched) == 2  # the class attentions (timm's talking heads have no fused path)
    q = checks.assert_off_equals_timm(ref, checks.images(3, 32, seed=5), features=False)
    assert [type(m) for m in q.modules() if isinstance(m, ATTENTIONS)] == [QuantTalkingHeadAttn] * 2 + [
        QuantClassAttn
    ] * 2


@pytest.mark.parametrize("fused", [True, False])
def test_explicit_matmul_path_matches_timm(fp, fused):
    ref = copy.deepcopy(fp)
    checks.set_fused_attn(ref, fused)
    checks.assert_explicit_path_close(
        ref, checks.images(2, 32, seed=5), features=False, attn_types=ATTENTIONS
    )


def test_w8a8_calibrates_close_and_w3a3_is_coarser(fp, calibrated):
    x = checks.images(16, 32, seed=2)
    checks.assert_calibration_errors(fp, calibrated[8], calibrated[3], x, W8A8_BOUND)
    net = calibrated[3]  # the class-attention layers (outside every unit) are calibrated and act
    with quant_mode(net, only=list(net.blocks_token_only)):
        assert checks.relative_error(net, fp, x) > 0


def test_roles_units_and_folds(fp):
    q = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=4, a_bits=4))
    layers = {layer.name: layer for layer in iter_qlayers(q)}
    roles = {
        "attn.qkv": "qkv",
        "attn.proj": "proj",
        "attn.matmul1": "matmul1",
        "attn.matmul2": "matmul2",
        "mlp.fc1": "fc1",
        "mlp.fc2": "fc2",
    }
    class_roles = {
        "attn.q": "qkv",
        "attn.k": "qkv",
        "attn.v": "qkv",
        "attn.proj": "proj",
        "attn.matmul1": "matmul1",
        "attn.matmul2": "matmul2",
        "mlp.fc1": "fc1",
        "mlp.fc2": "fc2",
    }
    expected = {"patch_embed.proj": "patch_embed", "head": "head"}
    for i in range(2):
        expected.update({f"blocks.{i}.{n}": r for n, r in roles.items()})
        expected.update({f"blocks_token_only.{i}.{n}": r for n, r in class_roles.items()})
    assert {n: layer.role for n, layer in layers.items()} == expected
    assert not any(n.endswith(("proj_l", "proj_w")) for n in layers)  # the talking heads stay float
    # fold partners: the talking-heads blocks are pre-norm; the class blocks' norm1 feeds q, k and v
    folds = {n: layer.norm for n, layer in layers.items() if layer.norm is not None}
    assert folds == {
        "blocks.0.attn.qkv": q.blocks[0].norm1,
        "blocks.0.mlp.fc1": q.blocks[0].norm2,
        "blocks.1.attn.qkv": q.blocks[1].norm1,
        "blocks.1.mlp.fc1": q.blocks[1].norm2,
        "blocks_token_only.0.mlp.fc1": q.blocks_token_only[0].norm2,
        "blocks_token_only.1.mlp.fc1": q.blocks_token_only[1].norm2,
    }
    # no unit has a class token: it is added after these blocks
    assert checks.unit_rows(q) == checks.vit_units(cls_token=False)
    # the class-attention blocks are no unit: each of their layers is its own calibration group
    assert all(layer.unit == n for n, layer in layers.items() if n.startswith("blocks_token_only."))
    mm1, mm2 = (
        layers["blocks_token_only.0.attn.matmul1"].module,
        layers["blocks_token_only.0.attn.matmul2"].module,
    )
    assert mm1.A_quantizer.scale.shape == (1, 3, 1, 1) and mm1.B_quantizer.scale.shape == (1, 3, 1, 17)
    assert mm2.A_quantizer.scale.shape == (1, 3, 1, 1) and mm2.B_quantizer.scale.shape == (1, 3, 1, 16)
    assert layers["blocks.0.attn.matmul1"].module.B_quantizer.scale.shape == (1, 3, 1, 16)  # no class token
    assert layers["blocks_token_only.0.attn.q"].module.a_quantizer.scale.shape == (1,)
    assert layers["blocks_token_only.0.attn.k"].module.a_quantizer.scale.shape == (1, 17, 1)


def test_w3a3_reconstruction_runs(fp, calibrated):
    net = copy.deepcopy(calibrated[3])
    class_weights = {n: p.clone() for n, p in net.blocks_token_only.named_parameters()}
    report = checks.assert_reconstruction_runs(
        net, checks.images(32, 32, seed=1), checks.images(4, 32, seed=2)
    )
    assert list(report.error_after) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    for n, p in net.blocks_token_only.named_parameters():  # not reconstructed: left as calibrated
        assert torch.equal(p, class_weights[n]), n


def test_state_dict_round_trip(fp, calibrated):
    other = quantize_model(tiny_model("cait", seed=1), QuantSpec(w_bits=8, a_bits=8))
    checks.assert_strict_round_trip(calibrated[8], other, checks.images(2, 32, seed=4))
