"""Deployable export: integer codes that reload into an identical model, ONNX with QDQ nodes that
onnxruntime runs within the stated tolerance, one clear error per bad file, and ``main.py export``."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_SWIN, TINY_VIT, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import fimaq
from fimaq.artifacts import resolve_checkpoint, save_quantized
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import QuantSpec
from fimaq.errors import FimaqError
from fimaq.export import (
    EXPORT_FORMAT,
    META_KEY,
    export_quantized,
    load_quantized,
    quantizers,
)
from fimaq.layers.mode import quant_mode
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4, num_classes=10))


def _meta(arch, kwargs, spec: QuantSpec) -> dict:
    quant = {"w_bits": spec.w_bits, "a_bits": spec.a_bits, "head_a_bits": spec.head_a_bits}
    return {"arch": arch, "model_kwargs": kwargs, "quant": {**quant, "overrides": spec.overrides}}


@torch.no_grad()
def _spread_qparams(net):
    """Qparams as reconstruction leaves them: per-token input scales, per-(head, row) matmul scales,
    and a weight zero point outside [0, 255]; every ONNX form gets used."""
    gen = torch.Generator().manual_seed(0)
    blocks = getattr(net, "blocks", None) or net.layers[0].blocks
    a = blocks[0].attn.qkv.a_quantizer
    a.scale.mul_(torch.linspace(0.9, 1.1, a.scale.numel()).view_as(a.scale))
    m = blocks[-1].attn.matmul1.A_quantizer
    m.scale.mul_(torch.rand(m.scale.shape, generator=gen) * 0.2 + 0.9)
    blocks[0].mlp.fc2.w_quantizer.zero_point[:2] = torch.tensor([[300.0], [-3.0]])


def _quantized(which, spec=None, spread=True):
    arch, kwargs = {"vit": TINY_VIT, "swin": TINY_SWIN}[which]
    spec = spec or QuantSpec(w_bits=4, a_bits=4)
    net = quantize_model(tiny_model(which), spec)
    torch.manual_seed(1)
    x = torch.randn(8, 3, kwargs["img_size"], kwargs["img_size"])
    minmax_calibrate(net, x)
    if spread:
        _spread_qparams(net)
    return net, x, _meta(arch, kwargs, spec)


@pytest.fixture(scope="module")
def digits():
    """The embedded digits DeiT at W4/A4 (min-max qparams, spread), with its validation images."""
    from fimaq.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup()
    images, _ = dm.calibration_tensors()
    xv, _ = dm.val_tensors()
    spec = QuantSpec(w_bits=4, a_bits=4)
    fp = create_fp_model(DIGITS[0], resolve_checkpoint("embedded:digits_deit_tiny"), model_kwargs=DIGITS[1])
    net = quantize_model(fp, spec)
    minmax_calibrate(net, images[:32])
    _spread_qparams(net)
    return net, xv, _meta(*DIGITS, spec)


@pytest.fixture(scope="module")
def digits_onnx(digits, tmp_path_factory):
    from fimaq.export_onnx import export_onnx

    net, xv, _ = digits
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_onnx(net, path, xv[:2], check_input=xv)


# ----------------------------------------------------------------------------- safetensors export
@pytest.mark.parametrize("which", ["vit", "swin"])
def test_reload_gives_identical_outputs_without_a_float_checkpoint(which, tmp_path, monkeypatch):
    net, x, meta = _quantized(which)
    path = tmp_path / "export.safetensors"
    export_quantized(net, meta, path, check_input=x[:2])

    def no_checkpoint(*_args, **_kwargs):
        raise AssertionError("load_quantized must not read a float checkpoint")

    monkeypatch.setattr("fimaq.models.factory.load_state_dict_file", no_checkpoint)
    torch.manual_seed(123)  # another random init underneath: every weight must come from the file
    loaded = fimaq.load_quantized(path)  # the lazy top-level name
    assert not loaded.training
    assert all(q.enabled for q in quantizers(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        # fake-quantizing the dequantized weights again is the identity
        for name, mod in loaded.named_modules():
            if hasattr(mod, "quantized_weight") and mod.w_quantizer.bits is not None:
                assert torch.equal(mod.quantized_weight(), mod.weight), name


def test_file_holds_integer_codes_qparams_and_metadata(tmp_path):
    spec = QuantSpec(
        w_bits=4,
        a_bits=4,
        overrides={"blocks.0.mlp.fc1": {"w_bits": 2}, "blocks.1.mlp.fc2": {"w_bits": 32, "a_bits": 8}},
    )
    net, x, meta = _quantized("vit", spec)
    path = tmp_path / "export.safetensors"
    info = export_quantized(net, {**meta, "stage": "calibrated"}, path)
    assert info["bytes"] == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert header["format"] == EXPORT_FORMAT and header["export_schema_version"] == 1
    assert header["arch"] == TINY_VIT[0] and header["stage"] == "calibrated"
    assert header["bits"]["blocks.0.mlp.fc1.w_quantizer"] == 2
    assert header["bits"]["blocks.1.mlp.fc2.a_quantizer"] == 8
    assert "blocks.1.mlp.fc2.w_quantizer" not in header["bits"]  # FP weight
    codes = {k: v for k, v in tensors.items() if k.endswith(".weight_codes")}
    assert len(codes) == 9  # 10 linear/conv layers, one kept in float
    for key, c in codes.items():
        layer = key.removesuffix(".weight_codes")
        bits = header["bits"][f"{layer}.w_quantizer"]
        assert c.dtype == torch.uint8 and int(c.max()) <= 2**bits - 1
        assert f"{layer}.weight" not in tensors  # no float copy of a quantized weight
        assert tensors[f"{layer}.w_quantizer.scale"].dtype == torch.float32
        assert tensors[f"{layer}.w_quantizer.zero_point"].dtype == torch.int32
    assert int(codes["blocks.0.mlp.fc1.weight_codes"].max()) <= 3
    assert tensors["blocks.1.mlp.fc2.weight"].dtype == torch.float32
    assert tensors["blocks.0.attn.qkv.a_quantizer.scale"].shape == (1, 17, 1)
    assert "patch_embed.proj.a_quantizer.scale" not in tensors  # FP image input: no qparams stored
    assert int(tensors["blocks.0.mlp.fc2.w_quantizer.zero_point"][0]) == 300
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(x), net(x))


def test_export_refuses_a_model_that_is_not_quantized(tmp_path):
    from fimaq.quant.adaround import attach_adaround

    net, _, meta = _quantized("vit", spread=False)
    with quant_mode(net, enabled=False), pytest.raises(FimaqError, match="quantization is off"):
        export_quantized(net, meta, tmp_path / "a.safetensors")
    attach_adaround(net.blocks[0].attn.qkv)
    with pytest.raises(FimaqError, match="AdaRound"):
        export_quantized(net, meta, tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    net, _, meta = _quantized("vit", spread=False)
    path = tmp_path_factory.mktemp("export") / "export.safetensors"
    export_quantized(net, meta, path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return path, tensors, header


def _rewrite(tmp_path, tensors, header, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(header)})
    return path


def _bad_files():
    """name -> (how to spoil a good export, expected message)."""
    qkv = "blocks.0.attn.qkv"

    def retensor(key, fn):
        return lambda t, h: ({**t, key: fn(t[key])}, h)

    return {
        "wrong schema version": (
            lambda t, h: (t, {**h, "export_schema_version": 99}),
            "export schema version 99, this fimaq reads version 1",
        ),
        "wrong shape": (
            retensor("pos_embed", lambda v: v[:, :3]),
            "tensor 'pos_embed' has shape (1, 3, 48), expected (1, 17, 48)",
        ),
        "NaN": (
            retensor("blocks.1.norm1.weight", lambda v: v.clone().fill_(float("nan"))),
            "tensor 'blocks.1.norm1.weight' holds NaN or Inf values",
        ),
        "wrong dtype": (
            retensor(f"{qkv}.weight_codes", lambda v: v.to(torch.int16)),
            f"tensor '{qkv}.weight_codes' has dtype torch.int16, expected torch.uint8",
        ),
        "codes out of range": (
            retensor(f"{qkv}.weight_codes", lambda v: v.clone().fill_(16)),
            f"codes of '{qkv}' reach 16, above 15 for its bits",
        ),
        "missing tensor": (
            lambda t, h: ({k: v for k, v in t.items() if k != "cls_token"}, h),
            "1 tensor(s) missing, 0 unexpected; first missing 'cls_token'",
        ),
        "negative scale": (
            retensor(f"{qkv}.a_quantizer.scale", lambda v: -v),
            f"{qkv}.a_quantizer.scale holds non-positive, NaN or Inf values",
        ),
        "unknown arch": (
            lambda t, h: (t, {**h, "arch": "vit_nonexistent_patch16"}),
            "unknown arch 'vit_nonexistent_patch16'",
        ),
        "bits disagree with spec": (
            lambda t, h: (t, {**h, "bits": {**h["bits"], f"{qkv}.w_quantizer": 3}}),
            f"recorded bits 3 for '{qkv}.w_quantizer' disagree with its quant spec (4)",
        ),
        "bad model_kwargs": (
            lambda t, h: (t, {**h, "model_kwargs": {**h["model_kwargs"], "no_such_option": 1}}),
            "no_such_option': 1} for 'deit_tiny_patch16_224': TypeError",
        ),
        "not an export": (
            lambda t, h: (t, {**h, "format": "something-else"}),
            "is not a fimaq export (format 'something-else')",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_files()))
def test_a_bad_export_gives_one_clear_error(case, good_export, tmp_path):
    _, tensors, header = good_export
    spoil, message = _bad_files()[case]
    path = _rewrite(tmp_path, *spoil(dict(tensors), dict(header)))
    with pytest.raises(FimaqError) as exc:
        load_quantized(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_unreadable_or_foreign_files_are_refused(good_export, tmp_path):
    path, tensors, _ = good_export
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FimaqError, match="truncated or not a safetensors file"):
        load_quantized(cut)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(FimaqError, match=r"is not a fimaq export \(no 'fimaq_export' metadata\)"):
        load_quantized(plain)
    artifact = tmp_path / "calibrated.safetensors"
    save_quantized(artifact, {"w": torch.zeros(2)}, {"arch": "x"})
    with pytest.raises(FimaqError, match="training artifact .* not an export: run `python main.py export"):
        load_quantized(artifact)
    with pytest.raises(FimaqError, match="export not found"):
        load_quantized(tmp_path / "nowhere.safetensors")
    pickle = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(FimaqError, match="truncated or not a safetensors file"):
        load_quantized(pickle)


# ----------------------------------------------------------------------------- ONNX
def test_onnx_has_qdq_nodes_and_matches_pytorch(digits, digits_onnx):
    import onnx

    from fimaq.export_onnx import export_module
    from fimaq.onnx_parity import onnx_session

    net, xv, _ = digits
    path, res = digits_onnx
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
    assert "Clip" in ops and "Round" in ops  # 4-bit clamp after QuantizeLinear; explicit quantizers
    assert res["forms"] == {"act_explicit": 2, "act_qdq": 31, "weight_explicit": 2, "weight_qdq": 16}
    uint8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    assert "blocks.0.attn.qkv.codes" in uint8 and "blocks.0.mlp.fc2.codes" in uint8
    # PyTorch runs of the export stand-ins are bit-identical to the model
    with torch.no_grad():
        assert torch.equal(export_module(net)(xv), net(xv))
    par = res["parity"]
    assert par["ok"] and par["images"] == 450
    assert par["mean_abs_diff"] <= par["mean_limit"]
    assert par["max_abs_diff"] <= par["max_limit"] == 0.1 * par["max_abs_logit"]
    assert par["argmax_agreement"] == 1.0 and par["failed"] == []
    session = onnx_session(path)
    for batch in (1, 5):  # dynamic batch
        out = session.run(["logits"], {"images": xv[:batch].numpy()})[0]
        assert out.shape == (batch, 10)


def test_onnx_parity_catches_a_missing_clamp(digits, digits_onnx, tmp_path):
    import onnx

    from fimaq.onnx_parity import onnx_parity

    net, xv, _ = digits
    model = onnx.load(str(digits_onnx[0]))
    graph = model.graph
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    clips = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Clip" and n.input[0] in quantized}
    assert len(clips) == 31
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in clips:
                n.input[i] = clips[name]
    keep = [n for n in graph.node if not (n.op_type == "Clip" and n.output[0] in clips)]
    del graph.node[:]
    graph.node.extend(keep)
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    par = onnx_parity(broken, net, xv[:64] * 2)  # brighter images: more inputs above the 4-bit range
    assert not par["ok"] and par["mean_abs_diff"] > 3 * par["mean_limit"]
    assert any(f.startswith("argmax differs on") for f in par["failed"])  # it changes predictions too


def test_an_export_that_fails_the_check_writes_nothing_and_names_the_output(digits, tmp_path, monkeypatch):
    from fimaq.export_onnx import export_onnx

    net, xv, _ = digits
    # a negative bound fails every export (onnxruntime may match PyTorch exactly on some CPUs)
    monkeypatch.setattr("fimaq.onnx_parity.MAX_REL", -1.0)
    with pytest.raises(FimaqError) as exc:
        export_onnx(net, tmp_path / "model.onnx", xv[:2], check_input=xv[:16])
    assert re.search(
        r"differs from PyTorch on the 16 check images, nothing written: max \|diff\| \S+ > \S+ "
        r"\(image \d+, logit \d+\)",
        str(exc.value),
    ), exc.value
    assert list(tmp_path.iterdir()) == []


def test_onnx_of_a_swin(tmp_path):
    import onnx

    from fimaq.export_onnx import export_onnx

    net, x, _ = _quantized("swin")
    res = export_onnx(net, tmp_path / "swin.onnx", x[:2], check_input=x)
    assert res["parity"]["ok"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "swin.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


# ----------------------------------------------------------------------------- command line
def _export_args(root, *extra):
    return [
        "export",
        "-c",
        str(ROOT / "configs/digits/w4a4.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_main_export_end_to_end(tmp_path, capsys, caplog):
    import logging

    from fimaq.cli import main
    from fimaq.data import DigitsDataModule
    from fimaq.module import QuantModel

    caplog.set_level(logging.INFO)
    root = tmp_path / "run"
    # a calibrated artifact, cheaply: min-max qparams instead of the searched calibration
    model = QuantModel(
        arch=DIGITS[0],
        checkpoint_path="embedded:digits_deit_tiny",
        model_kwargs=DIGITS[1],
        quant=QuantSpec(w_bits=4, a_bits=4),
    )
    dm = DigitsDataModule()
    dm.setup()
    images, _ = dm.calibration_tensors()
    minmax_calibrate(model.net, images[:16])
    artifact = root / "calibrated.safetensors"
    save_quantized(artifact, model.net.state_dict(), {**model.artifact_meta(), "stage": "calibrated"})

    with pytest.raises(SystemExit) as exc:  # a float model has nothing to export
        main(_export_args(root))
    assert exc.value.code == 2
    assert "export needs --model.init_from a quantized artifact" in capsys.readouterr().err

    main(_export_args(root, f"--model.init_from={artifact}", "--check_images=64"))
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["export_bytes"] == (root / "export.safetensors").stat().st_size
    assert metrics["onnx_bytes"] == (root / "model.onnx").stat().st_size
    assert metrics["export_reload_max_abs_diff"] == 0.0
    assert metrics["onnx_mean_abs_diff"] <= metrics["onnx_mean_limit"]
    assert metrics["onnx_argmax_agreement"] == 1.0
    assert metrics["onnx_max_abs_diff"] <= metrics["onnx_max_limit"]
    assert metrics["seconds"]["export"] > 0
    assert "export: wrote" in caplog.text and "argmax equal on all, max |diff|" in caplog.text
    xv, _ = dm.val_tensors()
    with torch.no_grad():
        assert torch.equal(load_quantized(root / "export.safetensors")(xv), model.net(xv))
