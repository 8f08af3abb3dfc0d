"""Quantization switched off reproduces the installed timm models exactly; swap details."""

import copy

import pytest
import torch

from fimaq.config import QuantSpec
from fimaq.errors import FimaqError
from fimaq.layers import QuantAttention, QuantLinear, QuantWindowAttention
from fimaq.layers.mode import quant_mode, set_quant_mode
from fimaq.models.swap import iter_qlayers, quantize_model
from tests.conftest import tiny_model


@pytest.mark.parametrize("which", ["vit", "swin"])
@pytest.mark.parametrize("fused", [True, False])
def test_quantization_off_equals_timm(which, fused):
    ref = tiny_model(which)
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    q = quantize_model(copy.deepcopy(ref), QuantSpec(w_bits=3, a_bits=3))
    x = torch.randn(3, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(ref(x), q(x))


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_explicit_matmul_path_matches_timm(which):
    """The path calibration captures from (explicit q @ k^T, scale after) agrees with timm to rounding."""
    ref = tiny_model(which)
    q = quantize_model(copy.deepcopy(ref), QuantSpec())
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad(), quant_mode(q, enabled=False, explicit_matmuls=True):
        assert all(
            m.explicit_matmuls for m in q.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))
        )
        torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)
    assert not any(
        m.explicit_matmuls for m in q.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))
    )


def test_deit_distilled_and_vit_variants_swap():
    import timm

    for arch in ("deit_tiny_distilled_patch16_224", "vit_small_patch16_224"):
        torch.manual_seed(0)
        ref = timm.create_model(arch, img_size=32, patch_size=8, depth=1, num_classes=5).eval()
        q = quantize_model(copy.deepcopy(ref), QuantSpec())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(ref(x), q(x))
        roles = [layer.role for layer in iter_qlayers(q)]
        assert roles[0] == "patch_embed" and "head" in roles and roles.count("qkv") == 1


def test_roles_shapes_and_strict_state_dict_round_trip():
    model = quantize_model(tiny_model("vit"), QuantSpec(w_bits=4, a_bits=3))
    layers = {layer.name: layer for layer in iter_qlayers(model)}
    assert layers["blocks.0.attn.qkv"].role == "qkv" and layers["blocks.0.attn.qkv"].norm is not None
    assert layers["blocks.0.mlp.fc2"].norm is None and layers["head"].role == "head"
    assert layers["blocks.0.attn.proj"].module.a_quantizer.scale.shape == (1, 17, 1)  # 16 patches + cls
    assert layers["blocks.0.attn.matmul2"].module.B_quantizer.scale.shape == (1, 3, 1, 16)
    assert layers["head"].module.a_quantizer.scale.shape == (1,)
    assert layers["patch_embed.proj"].module.a_quantizer.bits is None  # the image stays FP
    state = model.state_dict()
    other = quantize_model(tiny_model("vit", seed=1), QuantSpec(w_bits=4, a_bits=3))
    other.load_state_dict(state, strict=True)
    set_quant_mode(model, enabled=True)
    set_quant_mode(other, enabled=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_bit_overrides_and_bad_bits():
    spec = QuantSpec(w_bits=4, a_bits=4, overrides={"blocks.0.mlp.fc1": {"w_bits": 8, "a_bits": 32}})
    model = quantize_model(tiny_model("vit"), spec)
    fc1 = model.get_submodule("blocks.0.mlp.fc1")
    assert isinstance(fc1, QuantLinear) and fc1.w_quantizer.bits == 8 and fc1.a_quantizer.bits is None
    with pytest.raises(FimaqError, match="w_bits=9"):
        QuantSpec(w_bits=9).validate()
    with pytest.raises(FimaqError, match="unknown keys"):
        quantize_model(tiny_model("vit"), QuantSpec(overrides={"head": {"bits": 4}}))


def test_filter_fn_keeps_chosen_timm_modules_float():
    ref = tiny_model("swin")
    q = quantize_model(copy.deepcopy(ref), QuantSpec(), filter_fn=lambda m, name: name != "head.fc")
    assert type(q.head.fc) is torch.nn.Linear and isinstance(q.layers[1].downsample.reduction, QuantLinear)
    layers = {layer.name: layer for layer in iter_qlayers(q)}
    assert "head.fc" not in layers and layers["layers.1.downsample.reduction"].role == "reduction"
    assert layers["layers.1.downsample.reduction"].norm is q.layers[1].downsample.norm
    assert layers["layers.0.blocks.1.mlp.fc1"].norm is q.layers[0].blocks[1].norm2
    assert layers["patch_embed.proj"].unit == "patch_embed"
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(ref(x), q(x))
