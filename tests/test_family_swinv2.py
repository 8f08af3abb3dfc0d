"""timm Swin Transformer V2 (cosine window attention, continuous position bias, post-norm blocks): the
float function is kept exactly, the explicit matmul path agrees with timm, calibration gets close
at W8/A8, reconstruction runs, and roles, units and the state dict are what they should be."""

import copy
import math

import pytest
import torch

from fimaq.config import QuantSpec
from fimaq.errors import FimaqError
from fimaq.layers.swinv2 import QuantWindowAttentionV2
from fimaq.models.swap import iter_qlayers, quantize_model
from fimaq.recon import recon_units
from tests import family_checks as checks
from tests.conftest import tiny_model

W8A8_BOUND = 0.03  # measured 0.0107 (relative squared logit error on 16 random images; W3/A3: 0.087)


@pytest.fixture(scope="module", name="fp")
def _float_model() -> torch.nn.Module:
    """The tiny SwinV2 with non-trivial q/v biases, logit scales and post-norms (timm initialises the
    first two constant and the blocks' norm1/norm2 to zero: the blocks would add nothing)."""
    rules = {
        ("norm1.weight", "norm2.weight"): lambda z: 1 + 0.1 * z,
        ("q_bias", "v_bias", "norm1.bias", "norm2.bias"): lambda z: 0.1 * z,
        "logit_scale": lambda z: math.log(10) + 0.5 * z,
    }
    return checks.redraw_parameters(tiny_model("swinv2"), seed=3, rules=rules)


@pytest.fixture(scope="module")
def calibrated(fp):
    """bits -> the model quantized at W{bits}/A{bits} and calibrated on 32 random images."""
    return {bits: checks.calibrated_copy(fp, bits, checks.images(32, 64, seed=1)) for bits in (8, 3)}


def test_quantization_off_equals_timm(fp):
    from timm.models.swin_transformer_v2 import WindowAttention

    # timm's v2 attention has no fused (SDPA) path: there is no fused_attn switch to test both ways
    assert not any(hasattr(m, "fused_attn") for m in fp.modules() if isinstance(m, WindowAttention))
    q = checks.assert_off_equals_timm(fp, checks.images(3, 64, seed=5), features=False)
    assert sum(isinstance(m, QuantWindowAttentionV2) for m in q.modules()) == 4


def test_explicit_matmul_path_matches_timm(fp):
    checks.assert_explicit_path_close(
        fp, checks.images(2, 64, seed=5), features=False, attn_types=QuantWindowAttentionV2
    )


def test_qkv_bias_and_float_parts_are_kept(fp):
    q = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=8, a_bits=8))
    float_attn, attn = fp.layers[0].blocks[1].attn, q.layers[0].blocks[1].attn
    expected = torch.cat((float_attn.q_bias, torch.zeros_like(float_attn.q_bias), float_attn.v_bias))
    assert torch.equal(attn.qkv.bias, expected)
    names = set(q.state_dict())
    for kept in ("logit_scale", "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight"):
        assert f"layers.0.blocks.1.attn.{kept}" in names
    assert not any(n.endswith(("relative_coords_table", "relative_position_index")) for n in names)
    assert q.layers[0].blocks[1].attn_mask is not None  # the shifted block's mask stays the block's


def test_w8a8_calibrates_close_and_w3a3_is_coarser(fp, calibrated):
    checks.assert_calibration_errors(
        fp, calibrated[8], calibrated[3], checks.images(16, 64, seed=2), W8A8_BOUND
    )


def test_roles_units_and_no_folds(fp):
    q = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=4, a_bits=4))
    layers = {layer.name: layer for layer in iter_qlayers(q)}
    block = "layers.1.blocks.0"
    expected = {
        f"{block}.attn.qkv": "qkv",
        f"{block}.attn.proj": "proj",
        f"{block}.attn.matmul1": "matmul1",
        f"{block}.attn.matmul2": "matmul2",
        f"{block}.mlp.fc1": "fc1",
        f"{block}.mlp.fc2": "fc2",
        "layers.1.downsample.reduction": "reduction",
        "patch_embed.proj": "patch_embed",
        "head.fc": "head",
    }
    assert {n: layers[n].role for n in expected} == expected
    assert len(layers) == 1 + 4 * 6 + 1 + 1
    assert all(layer.norm is None for layer in layers.values())  # post-norm blocks, reduction-then-norm merge
    assert not any(".cpb_mlp." in n for n in layers)  # the position-bias MLP stays float
    assert layers[f"{block}.attn.matmul1"].unit == block
    assert layers[f"{block}.attn.matmul1"].module.A_quantizer.scale.shape == (1, 4, 16, 1)  # 4x4 windows
    assert layers[f"{block}.attn.matmul2"].module.B_quantizer.scale.shape == (1, 4, 1, 16)  # head dim 16
    assert checks.unit_rows(q) == [
        ("patch_embed", "patch_embed", False),
        ("layers.0.blocks.0", "block", False),
        ("layers.0.blocks.1", "block", False),
        ("layers.1.downsample", "merge", False),
        ("layers.1.blocks.0", "block", False),
        ("layers.1.blocks.1", "block", False),
        ("head.fc", "head", False),
    ]


def test_w3a3_reconstruction_runs(fp, calibrated):
    net = copy.deepcopy(calibrated[3])
    report = checks.assert_reconstruction_runs(
        net, checks.images(32, 64, seed=1), checks.images(4, 64, seed=2)
    )
    assert list(report.error_after) == [u.name for u in recon_units(net)]


def test_state_dict_round_trip(fp, calibrated):
    other = quantize_model(tiny_model("swinv2", seed=1), QuantSpec(w_bits=8, a_bits=8))
    checks.assert_strict_round_trip(calibrated[8], other, checks.images(2, 64, seed=4))


def test_separate_qkv_bias_is_refused():
    from timm.models.swin_transformer_v2 import WindowAttention

    attn = WindowAttention(32, (4, 4), 2, qkv_bias_separate=True)
    bits = {part: (8, 8) for part in ("qkv", "proj", "matmul1", "matmul2")}
    with pytest.raises(FimaqError, match="qkv_bias_separate"):
        QuantWindowAttentionV2.from_float(attn, bits)
