"""A model family that is not timm's, added with one registration: swap, units, roles, folds, and the
whole calibration + reconstruction pipeline on it; glob/regex bit overrides."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimaq.calib import calibrate_model
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.errors import FimaqError
from fimaq.layers import QuantConv2d, QuantLinear, QuantMatMul
from fimaq.models import Quantizable, SwapContext, iter_qlayers, quantize_model, register
from fimaq.recon import recon_units, reconstruct_model
from tests.conftest import tiny_model

DIM, HEADS, IMG, PATCH = 32, 2, 16, 4  # 16 patches + the class token


def attend(x, qkv, proj, mm1, mm2, heads: int, scale: float) -> torch.Tensor:
    """Self-attention with explicit products (shared by the float and the quantized toy)."""
    B, N, C = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (mm1(q, k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return proj(mm2(attn, v).transpose(1, 2).reshape(B, N, C))


class ToyPatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_size = (IMG, IMG)
        self.proj = nn.Conv2d(3, DIM, PATCH, PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ToyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = (DIM // HEADS) ** -0.5
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attend(x, self.qkv, self.proj, torch.matmul, torch.matmul, HEADS, self.scale)


class QuantToyAttention(nn.Module):
    """The toy attention with quantized linears and both products as QuantMatMul."""

    def __init__(self, attn: ToyAttention, ctx: SwapContext) -> None:
        super().__init__()
        (n,) = ctx.token_shape
        self.scale = attn.scale
        self.qkv = QuantLinear.from_float(attn.qkv, *ctx.child("qkv").bits(), token_shape=(n,))
        self.proj = QuantLinear.from_float(attn.proj, *ctx.child("proj").bits(), token_shape=(n,))
        self.matmul1 = QuantMatMul(HEADS, n, n, *ctx.child("matmul1").bits())
        self.matmul2 = QuantMatMul(HEADS, n, DIM // HEADS, *ctx.child("matmul2").bits())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attend(x, self.qkv, self.proj, self.matmul1, self.matmul2, HEADS, self.scale)


class ToyMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), ToyAttention()
        self.norm2, self.mlp = nn.LayerNorm(DIM), ToyMlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = ToyPatchEmbed()
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (IMG // PATCH) ** 2, DIM) * 0.02)
        self.blocks = nn.Sequential(ToyBlock(), ToyBlock())
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


ATTN_ROLES = {"qkv": "qkv", "proj": "proj", "matmul1": "matmul1", "matmul2": "matmul2"}
TOY_FAMILY = (
    Quantizable(ToyPatchEmbed, unit="patch_embed", roles={"proj": "patch_embed"}),
    Quantizable(ToyAttention, QuantToyAttention, QuantToyAttention, roles=ATTN_ROLES, input="qkv"),
    Quantizable(ToyMlp, roles={"fc1": "fc1", "fc2": "fc2"}, input="fc1"),
    Quantizable(ToyBlock, unit="block", norms={"norm1": "attn", "norm2": "mlp"}, cls_token=True),
    Quantizable(ToyViT, heads=("head",)),
)


@pytest.fixture
def toy():
    """A random toy model, its family registered for the test only."""
    with register(*TOY_FAMILY):
        torch.manual_seed(0)
        yield ToyViT().eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_quantize_model_swaps_the_family_and_off_equals_float(toy):
    q = quantize_model(copy.deepcopy(toy), QuantSpec(w_bits=4, a_bits=4))
    for i in range(2):
        assert type(q.blocks[i].attn) is QuantToyAttention
        assert type(q.blocks[i].mlp.fc1) is QuantLinear and type(q.blocks[i].mlp.fc2) is QuantLinear
        assert q.blocks[i].attn.qkv.a_quantizer.scale.shape == (1, 17, 1)
        assert q.blocks[i].attn.matmul1.A_quantizer.scale.shape == (1, HEADS, 17, 1)
    assert type(q.patch_embed.proj) is QuantConv2d and type(q.head) is QuantLinear
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(q(x), toy(x))  # every quantizer off: exactly the float model


def test_filter_fn_decides_which_modules_are_swapped(toy):
    keep_float = {"blocks.1.attn", "head"}
    q = quantize_model(copy.deepcopy(toy), QuantSpec(), filter_fn=lambda m, name: name not in keep_float)
    assert type(q.blocks[0].attn) is QuantToyAttention and type(q.blocks[1].attn) is ToyAttention
    assert type(q.head) is nn.Linear
    # the float attention's linears are offered on their own and keep their roles
    layers = {layer.name: layer.role for layer in iter_qlayers(q)}
    assert layers["blocks.1.attn.qkv"] == "qkv" and layers["blocks.1.attn.proj"] == "proj"
    assert "blocks.1.attn.matmul1" not in layers and "head" not in layers
    only_attn = quantize_model(copy.deepcopy(toy), QuantSpec(), lambda m, _: isinstance(m, ToyAttention))
    swapped = sorted(n for n, m in only_attn.named_modules() if isinstance(m, QuantLinear))
    assert swapped == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("proj", "qkv")]
    assert type(only_attn.patch_embed.proj) is nn.Conv2d


def test_units_roles_and_fold_partners(toy):
    q = quantize_model(toy, QuantSpec())
    units = [(u.name, u.kind, u.has_cls_token) for u in recon_units(q)]
    assert units == [
        ("patch_embed", "patch_embed", False),
        ("blocks.0", "block", True),
        ("blocks.1", "block", True),
        ("head", "head", False),
    ]
    names = {id(m): n for n, m in q.named_modules()}
    got = [(x.name, x.role, x.unit, names.get(id(x.norm))) for x in iter_qlayers(q)]
    expected = [("patch_embed.proj", "patch_embed", "patch_embed", None)]
    for i in range(2):
        b = f"blocks.{i}"
        expected += [
            (f"{b}.attn.qkv", "qkv", b, f"{b}.norm1"),
            (f"{b}.attn.proj", "proj", b, None),
            (f"{b}.attn.matmul1", "matmul1", b, None),
            (f"{b}.attn.matmul2", "matmul2", b, None),
            (f"{b}.mlp.fc1", "fc1", b, f"{b}.norm2"),
            (f"{b}.mlp.fc2", "fc2", b, None),
        ]
    expected.append(("head", "head", "head", None))
    assert got == expected


def _logit_error(net: nn.Module, fp: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x) - fp(x)).pow(2).mean())


def test_calibration_and_reconstruction_run_on_the_family(toy):
    spec = QuantSpec(w_bits=4, a_bits=4)
    calib, test = _images(32, seed=1), _images(32, seed=2)
    naive = quantize_model(copy.deepcopy(toy), spec)
    minmax_calibrate(naive, calib)
    net = quantize_model(copy.deepcopy(toy), spec)
    calibrate_model(net, calib, CalibConfig(num_images=32, eq_n=32, search_rounds=1), progress=False)
    calibrated = copy.deepcopy(net)
    # the LayerNorm folds changed the float weights but not the float function
    assert not torch.equal(net.blocks[0].norm1.weight, toy.blocks[0].norm1.weight)
    cfg = ReconConfig(iters=30, batch_size=8, loss="mse", error_images=16)
    report = reconstruct_model(net, calib, cfg, FisherConfig(), progress=False)
    assert list(report.error_after) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    errors = {
        k: _logit_error(m, toy, test) for k, m in [("naive", naive), ("calib", calibrated), ("recon", net)]
    }
    assert all(torch.isfinite(torch.tensor(e)) for e in errors.values()), errors
    with torch.no_grad():
        scale = float(toy(test).pow(2).mean())
    assert 0 < errors["recon"] < 0.5 * scale, (errors, scale)  # quantized, yet close to the FP logits
    assert errors["calib"] < errors["naive"], errors  # the searched scales beat plain min-max
    assert errors["recon"] < errors["naive"], errors


def test_glob_and_regex_overrides_resolve_by_precedence():
    spec = QuantSpec(
        w_bits=4,
        a_bits=4,
        overrides={
            "blocks.1.mlp.fc2": {"a_bits": 32},  # exact: wins over every pattern, whatever its place
            "blocks.*.mlp.fc2": {"w_bits": 8, "a_bits": 8},
            r"re:blocks\.1[01]\..*": {"w_bits": 6},
            "blocks.1*.mlp.*": {"w_bits": 3},  # later pattern: wins over the regex for blocks.10/11 mlp
        },
    ).validate()
    expected = {
        "blocks.0.mlp.fc2": (8, 8),
        "blocks.1.mlp.fc2": (3, None),  # "blocks.1*" also matches blocks.1
        "blocks.10.mlp.fc2": (3, 8),
        "blocks.11.attn.qkv": (6, 4),
        "blocks.11.mlp.fc1": (3, 4),
        "blocks.12.attn.qkv": (4, 4),  # the regex is anchored: 12 is not 1[01]
        "blocks.2.mlp.fc1": (4, 4),
        "head": (4, 4),
    }
    assert {name: spec.bits_for(name, "linear") for name in expected} == expected
    assert QuantSpec(overrides={"blocks.*.attn.matmul1": {"a_bits": 8}}).bits_for(
        "blocks.3.attn.matmul1", "matmul"
    ) == (4, 8)


def test_override_patterns_on_a_timm_model_and_unmatched_ones():
    spec = QuantSpec(
        w_bits=4, a_bits=4, overrides={"blocks.*.mlp.fc2": {"w_bits": 8}, "re:.*qkv": {"a_bits": 6}}
    )
    net = quantize_model(tiny_model("vit"), spec)
    bits = {
        x.name: (x.module.w_quantizer.bits, x.module.a_quantizer.bits)
        for x in iter_qlayers(net)
        if isinstance(x.module, QuantLinear)
    }
    assert bits["blocks.0.mlp.fc2"] == bits["blocks.1.mlp.fc2"] == (8, 4)
    assert bits["blocks.1.attn.qkv"] == (4, 6) and bits["blocks.0.mlp.fc1"] == (4, 4)
    with pytest.raises(FimaqError, match=r"'blocks\.\*\.mlp\.fc3' matches no quantized layer"):
        quantize_model(tiny_model("vit"), QuantSpec(overrides={"blocks.*.mlp.fc3": {"w_bits": 8}}))
    with pytest.raises(FimaqError, match=re.escape(r"pattern 're:blocks\.9\..*' matches no quantized")):
        quantize_model(tiny_model("vit"), QuantSpec(overrides={r"re:blocks\.9\..*": {"w_bits": 8}}))
    with pytest.raises(FimaqError, match="not a valid regular expression"):
        QuantSpec(overrides={"re:blocks.(": {"w_bits": 8}}).validate()
    # an exact name the model lacks is left to the caller (a bit plan's names: BitPlan.check_layers)
    quantize_model(tiny_model("vit"), QuantSpec(overrides={"blocks.7.attn.qkv": {"w_bits": 8}}))


def test_registration_is_scoped_and_clashes_are_refused():
    with register(*TOY_FAMILY):
        quantize_model(ToyViT().eval(), QuantSpec())
        with pytest.raises(FimaqError, match="ToyMlp is already registered"):
            register(Quantizable(ToyMlp))
    with pytest.raises(FimaqError, match="no registered transformer block"):
        quantize_model(ToyViT().eval(), QuantSpec())
    handle = register(*TOY_FAMILY)
    handle.remove()
    with pytest.raises(FimaqError, match="nn.Linear|Linear is already registered"):
        register(Quantizable(nn.Linear))  # the built-ins stay
    assert [u.kind for u in recon_units(quantize_model(tiny_model("vit"), QuantSpec()))][-1] == "head"
