"""timm CaiT (talking-heads self-attention blocks, then class-attention blocks): the float function is
kept exactly (fused and explicit class attention), the explicit matmul path agrees with timm,
calibration gets close at W8/A8, reconstruction runs with the class-attention blocks outside every
unit, and roles, units, folds and the state dict are what they should be."""

import copy

import pytest
import torch

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.layers.cait import QuantClassAttn, QuantTalkingHeadAttn
from fimaq.layers.mode import quant_mode, set_quant_mode
from fimaq.models.swap import iter_qlayers, quantize_model
from fimaq.recon import recon_units, reconstruct_model
from tests.conftest import tiny_model

CALIB = CalibConfig(num_images=32, eq_n=32, search_rounds=1)
W8A8_BOUND = 0.003  # measured 0.00094 (relative squared logit error on 16 random images; W3/A3: 0.029)
ATTENTIONS = (QuantTalkingHeadAttn, QuantClassAttn)


def _float_model() -> torch.nn.Module:
    """The tiny CaiT with LayerScales of about 0.5 (timm's 1e-4 would hide every block's error)."""
    fp = tiny_model("cait")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in fp.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=gen))
    return fp


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _relative_error(net, fp, x) -> float:
    with torch.no_grad():
        ref = fp(x)
        return float((net(x) - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.fixture(scope="module")
def fp():
    return _float_model()


@pytest.fixture(scope="module")
def calibrated(fp):
    """bits -> the model quantized at W{bits}/A{bits} and calibrated on 32 random images."""
    nets = {}
    for bits in (8, 3):
        net = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=bits, a_bits=bits))
        calibrate_model(net, _images(32, seed=1), CALIB, progress=False)
        nets[bits] = net
    return nets


@pytest.mark.parametrize("fused", [True, False])
def test_quantization_off_equals_timm(fp, fused):
    ref = copy.deepcopy(fp)
    switched = [m for m in ref.modules() if hasattr(m, "fused_attn")]
    assert len(switched) == 2  # the class attentions (timm's talking heads have no fused path)
    for m in switched:
        m.fused_attn = fused
    q = quantize_model(copy.deepcopy(ref), QuantSpec(w_bits=3, a_bits=3))
    assert [type(m) for m in q.modules() if isinstance(m, ATTENTIONS)] == [QuantTalkingHeadAttn] * 2 + [
        QuantClassAttn
    ] * 2
    x = _images(3, seed=5)
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("fused", [True, False])
def test_explicit_matmul_path_matches_timm(fp, fused):
    ref = copy.deepcopy(fp)
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    q = quantize_model(copy.deepcopy(ref), QuantSpec())
    attns = [m for m in q.modules() if isinstance(m, ATTENTIONS)]
    x = _images(2, seed=5)
    with torch.no_grad(), quant_mode(q, enabled=False, explicit_matmuls=True):
        assert all(m.explicit_matmuls and m._use_matmuls() for m in attns)
        torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)
    assert not any(m.explicit_matmuls for m in attns)


def test_w8a8_calibrates_close_and_w3a3_is_coarser(fp, calibrated):
    x = _images(16, seed=2)
    err8 = _relative_error(calibrated[8], fp, x)
    err3 = _relative_error(calibrated[3], fp, x)
    assert 0 < err8 < W8A8_BOUND, err8
    assert err3 > err8, (err3, err8)
    net = calibrated[3]  # the class-attention layers (outside every unit) are calibrated and act
    with quant_mode(net, only=list(net.blocks_token_only)):
        assert _relative_error(net, fp, x) > 0


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
    units = [(u.name, u.kind, u.has_cls_token) for u in recon_units(q)]
    assert units == [
        ("patch_embed", "patch_embed", False),
        ("blocks.0", "block", False),  # the class token is added after these blocks
        ("blocks.1", "block", False),
        ("head", "head", False),
    ]
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
    cfg = ReconConfig(iters=10, batch_size=8, loss="mse", error_images=16)
    report = reconstruct_model(net, _images(32, seed=1), cfg, FisherConfig(), progress=False)
    assert list(report.error_after) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    for n, p in net.blocks_token_only.named_parameters():  # not reconstructed: left as calibrated
        assert torch.equal(p, class_weights[n]), n
    with torch.no_grad():
        assert torch.isfinite(net(_images(4, seed=2))).all()


def test_state_dict_round_trip(fp, calibrated):
    net = calibrated[8]
    other = quantize_model(tiny_model("cait", seed=1), QuantSpec(w_bits=8, a_bits=8))
    other.load_state_dict(net.state_dict(), strict=True)
    set_quant_mode(other, enabled=True)
    x = _images(2, seed=4)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))
