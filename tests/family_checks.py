"""Checks shared by the tests of the timm families (BEiT, ViT-RelPos, EVA, CaiT, Swin V2, ...): seeded
random images, the relative logit error, the fused-attention switch, quantizers off equal to timm, the
explicit-matmul path, calibration and reconstruction on tiny models and a strict state_dict round trip.

Import it the way the test file imports ``conftest``: ``from tests import family_checks as checks`` next
to ``from tests.conftest import ...``, ``from family_checks import ...`` next to ``from conftest import ...``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.layers.mode import quant_mode, set_quant_mode
from fimaq.models.swap import iter_qlayers, quantize_model
from fimaq.recon import ReconReport, recon_units, reconstruct_model

#: the calibration of the tiny family models (32 images, one search round)
CALIB = CalibConfig(num_images=32, eq_n=32, search_rounds=1)
#: a short reconstruction run (10 iterations per unit)
RECON = ReconConfig(iters=10, batch_size=8, loss="mse", error_images=16)


def images(n: int, size: int | tuple[int, int], seed: int) -> torch.Tensor:
    """``n`` standard normal RGB images of ``size`` (a side, or (height, width)), drawn from ``seed``."""
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def relative_error(net: nn.Module, fp: nn.Module, x: torch.Tensor) -> float:
    """The relative squared logit error ||net(x) - fp(x)||^2 / ||fp(x)||^2."""
    with torch.no_grad():
        ref = fp(x)
        return float((net(x) - ref).pow(2).sum() / ref.pow(2).sum())


def redraw_parameters(
    model: nn.Module, seed: int, rules: dict[str | tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]
) -> nn.Module:
    """Overwrite (in place) each parameter of ``model`` whose name ends with a key of ``rules`` (the first
    that matches) with ``rule(z)``, ``z`` standard normal noise of its shape; one generator seeded with
    ``seed`` draws the noise in parameter order. timm starts many parameters at constants (zero biases,
    1e-6 layer scales) that would hide what a test checks. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            rule = next((r for suffix, r in rules.items() if name.endswith(suffix)), None)
            if rule is not None:
                p.copy_(rule(torch.randn(p.shape, generator=gen)))
    return model


def set_fused_attn(model: nn.Module, fused: bool) -> list[nn.Module]:
    """Set ``fused_attn`` (timm's SDPA switch) on every module of ``model`` that has one; returns them."""
    switched = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in switched:
        m.fused_attn = fused
    return switched


def unit_rows(q: nn.Module) -> list[tuple[str, str, bool]]:
    """(name, kind, has_cls_token) of each reconstruction unit of the quantized ``q``, in order."""
    return [(u.name, u.kind, u.has_cls_token) for u in recon_units(q)]


def vit_units(cls_token: bool) -> list[tuple[str, str, bool]]:
    """The :func:`unit_rows` of a tiny two-block ViT-like model (patch embedding, blocks, head)."""
    return [
        ("patch_embed", "patch_embed", False),
        ("blocks.0", "block", cls_token),
        ("blocks.1", "block", cls_token),
        ("head", "head", False),
    ]


def assert_off_equals_timm(fp: nn.Module, x: torch.Tensor, bits: int = 3, features: bool = True) -> nn.Module:
    """A copy of the float ``fp`` quantized at W{bits}/A{bits}, with its quantizers off (as quantization
    leaves them), computes exactly what ``fp`` does: the logits and, with ``features``,
    ``forward_features``. Returns that quantized copy."""
    q = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=bits, a_bits=bits))
    with torch.no_grad():
        if features:
            assert torch.equal(q.forward_features(x), fp.forward_features(x))
        assert torch.equal(q(x), fp(x))
    return q


def assert_explicit_path_close(
    fp: nn.Module,
    x: torch.Tensor,
    *,
    q: nn.Module | None = None,
    features: bool = True,
    matmul: str | None = None,
    attn_types: type[nn.Module] | tuple[type[nn.Module], ...] = (),
) -> None:
    """In float, with attention routed through its explicit matmul modules, the quantized ``q`` (by
    default a copy of ``fp`` quantized with the default :class:`QuantSpec`) agrees with ``fp``
    (rtol = atol = 1e-5) on the logits and, with ``features``, ``forward_features``.

    ``matmul``: the name of a matmul module of ``q`` that must run on that path (a forward hook proves
    it did). ``attn_types``: the attention modules of ``q`` of these types must use their matmuls
    inside the mode and no longer after it.
    """
    if q is None:
        q = quantize_model(copy.deepcopy(fp), QuantSpec())
    attns = [m for m in q.modules() if isinstance(m, attn_types)]
    calls = []
    hook = q.get_submodule(matmul).register_forward_hook(lambda *_: calls.append(1)) if matmul else None
    with torch.no_grad(), quant_mode(q, enabled=False, explicit_matmuls=True):
        assert all(m.explicit_matmuls and m._use_matmuls() for m in attns)
        if features:
            torch.testing.assert_close(q.forward_features(x), fp.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q(x), fp(x), rtol=1e-5, atol=1e-5)
    assert not any(m.explicit_matmuls for m in attns)
    if hook is not None:
        hook.remove()
        assert calls  # the products went through the QuantMatMul modules


def calibrated_copy(
    fp: nn.Module, bits: int, calib_images: torch.Tensor, cfg: CalibConfig = CALIB
) -> nn.Module:
    """A copy of ``fp`` quantized at W{bits}/A{bits} and calibrated on ``calib_images``."""
    net = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=bits, a_bits=bits))
    calibrate_model(net, calib_images, cfg, progress=False)
    return net


def assert_calibration_errors(
    fp: nn.Module, w8: nn.Module, w3: nn.Module, x: torch.Tensor, w8_bound: float, factor: float = 1.0
) -> tuple[float, float]:
    """The calibrated W8/A8 ``w8`` is within ``w8_bound`` of ``fp`` on ``x`` (relative error, above
    zero: the quantizers act) and the W3/A3 ``w3`` more than ``factor`` times further; returns both."""
    err8 = relative_error(w8, fp, x)
    err3 = relative_error(w3, fp, x)
    assert 0 < err8 < w8_bound, err8
    assert err3 > factor * err8, (err3, err8)
    return err8, err3


def assert_reconstruction_runs(
    net: nn.Module, calib_images: torch.Tensor, test_images: torch.Tensor, cfg: ReconConfig = RECON
) -> ReconReport:
    """Reconstruct the calibrated ``net`` in place on ``calib_images``; it then gives finite logits on
    ``test_images``. Returns the reconstruction report."""
    report = reconstruct_model(net, calib_images, cfg, FisherConfig(), progress=False)
    with torch.no_grad():
        assert torch.isfinite(net(test_images)).all()
    return report


def assert_strict_round_trip(net: nn.Module, other: nn.Module, x: torch.Tensor) -> None:
    """``other`` (quantized like ``net``) loads ``net``'s state_dict strictly and, both quantizing,
    computes exactly what ``net`` does on ``x``."""
    other.load_state_dict(net.state_dict(), strict=True)
    set_quant_mode(net, enabled=True)
    set_quant_mode(other, enabled=True)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))


def assert_vit_roles_units_and_folds(q: nn.Module, cls_token: bool, pre_norm: bool = True) -> None:
    """The quantized tiny two-block, three-head ViT-like ``q`` (16 patches, 48 channels): its units,
    each layer's role, unit and folded LayerNorm (``norm1`` into qkv and ``norm2`` into fc1 when
    ``pre_norm``, none otherwise) and the shapes of blocks.0's activation quantizer scales."""
    assert unit_rows(q) == vit_units(cls_token)
    names = {id(m): n for n, m in q.named_modules()}
    got = [(x.name, x.role, x.unit, names.get(id(x.norm))) for x in iter_qlayers(q)]
    expected = [("patch_embed.proj", "patch_embed", "patch_embed", None)]
    for i in range(2):
        b = f"blocks.{i}"
        expected += [
            (f"{b}.attn.qkv", "qkv", b, f"{b}.norm1" if pre_norm else None),
            (f"{b}.attn.proj", "proj", b, None),
            (f"{b}.attn.matmul1", "matmul1", b, None),
            (f"{b}.attn.matmul2", "matmul2", b, None),
            (f"{b}.mlp.fc1", "fc1", b, f"{b}.norm2" if pre_norm else None),
            (f"{b}.mlp.fc2", "fc2", b, None),
        ]
    expected.append(("head", "head", "head", None))
    assert got == expected
    n = 17 if cls_token else 16
    layers = {x.name: x.module for x in iter_qlayers(q)}
    assert layers["blocks.0.attn.qkv"].a_quantizer.scale.shape == (1, n, 1)
    assert layers["blocks.0.attn.matmul1"].A_quantizer.scale.shape == (1, 3, n, 1)
    assert layers["blocks.0.attn.matmul2"].B_quantizer.scale.shape == (1, 3, 1, 16)
