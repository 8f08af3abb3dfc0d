"""The command line: every YAML parses with every subcommand, calibrate runs end to end, bad input
gives one clear line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fimaq.artifacts import read_artifact
from fimaq.cli import FimaqCLI, main
from fimaq.data import PTQDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


class ParseOnlyCLI(FimaqCLI):
    """Parses and validates a config without building models or touching data."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def test_there_are_configs_for_every_promised_model():
    names = {p.stem for p in CONFIGS}
    assert {"w3a3", "w4a4", "w8a8"} <= names
    for model in (
        "vit_small",
        "vit_base",
        "deit_tiny",
        "deit_small",
        "deit_base",
        "swin_tiny",
        "swin_small",
        "swin_base",
        "swinv2_tiny",
        "eva02_small",
        "beit_base",
        "cait_s24",
    ):
        assert {f"{model}_w3a3", f"{model}_w4a4"} <= names


@pytest.mark.parametrize("subcommand", sorted(FimaqCLI.subcommands()))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_parses_with_every_subcommand(config, subcommand):

    from fimaq.cli import FimaqTrainer
    from fimaq.module import QuantModel

    cli = ParseOnlyCLI(
        QuantModel,
        PTQDataModule,
        subclass_mode_data=True,
        trainer_class=FimaqTrainer,
        args=[subcommand, "-c", str(config)],
    )
    cfg = cli.config[subcommand]
    w_bits, a_bits = re.fullmatch(r"w(\d)a(\d)", config.stem.split("_")[-1]).groups()  # e.g. w2a3
    assert cfg.model.quant.w_bits == int(w_bits) and cfg.model.quant.a_bits == int(a_bits)
    assert cfg.trainer.default_root_dir.endswith(config.stem)


def _validate_args(config: str, root, artifact: str) -> list[str]:
    return [
        "validate",
        "-c",
        str(ROOT / config),
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--model.init_from={root / artifact}",
    ]


def test_calibrate_end_to_end_writes_artifacts(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    root = tmp_path / "run"
    args = [
        "calibrate",
        "-c",
        str(ROOT / "configs/digits/w8a8.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--model.calib.search_rounds=1",
        "--model.calib.num_images=16",
        "--data.init_args.calib_size=16",
    ]
    main(args)
    metrics = json.loads((root / "metrics.json").read_text())
    # top-1 is the plain fraction of correct argmax predictions over the 450 validation digits
    from fimaq.artifacts import resolve_checkpoint
    from fimaq.data import DigitsDataModule
    from fimaq.models import create_fp_model

    dm = DigitsDataModule()
    dm.setup()
    xv, yv = dm.val_tensors()
    fp = create_fp_model(
        "deit_tiny_patch16_224",
        resolve_checkpoint("embedded:digits_deit_tiny"),
        model_kwargs={"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10},
    )
    with torch.no_grad():
        plain = 100.0 * (fp(xv).argmax(-1) == yv).float().mean().item()
    assert metrics["fp_top1"] == pytest.approx(plain, abs=1e-3)
    assert metrics["fp_top1"] > 95.0
    assert metrics["calibrated_top1"] > metrics["fp_top1"] - 2.0  # W8/A8 stays close to FP
    assert metrics["seconds"]["calibrate"] > 0
    state, meta = read_artifact(root / "calibrated.safetensors")
    assert (
        meta["arch"] == "deit_tiny_patch16_224"
        and meta["quant"]["w_bits"] == 8
        and meta["stage"] == "calibrated"
    )
    assert state["blocks.0.attn.qkv.a_quantizer.scale"].shape == (1, 65, 1)

    # the artifact validates on its own (metrics.json in the validate run's folder, percent on the
    # console), and a config of other bit-widths refuses it
    check = tmp_path / "check"
    args = _validate_args("configs/digits/w8a8.yaml", root, "calibrated.safetensors")
    main([*args, f"--trainer.default_root_dir={check}"])
    again = json.loads((check / "metrics.json").read_text())
    assert again["calibrated_top1"] == pytest.approx(metrics["calibrated_top1"], abs=1e-6)
    assert f"calibrated top-1 {again['calibrated_top1']:.2f}%" in caplog.text
    assert "GPU available" not in caplog.text and "Tip:" not in caplog.text
    with pytest.raises(SystemExit) as exc:
        main(_validate_args("configs/digits/w4a4.yaml", root, "calibrated.safetensors"))
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.arch=vit_nonexistent_patch16"], "unknown arch 'vit_nonexistent_patch16'"),
        (
            ["--model.checkpoint_path=/no/such/file.safetensors"],
            "checkpoint not found: /no/such/file.safetensors",
        ),
        (["--model.quant.w_bits=9"], "w_bits=9 is outside the supported range 2..8"),
        (
            ["--model.model_kwargs={img_size: 32, patch_size: 4, depth: 2, num_classes: 10}"],
            "does not fit arch",
        ),
        (
            ["--model.model_kwargs={img_size: 32, patch_size: 4, depth: 4, num_classes: 10, num_heads: 5}"],
            "'num_heads': 5} for 'deit_tiny_patch16_224': AssertionError: dim should be divisible by "
            "num_heads",
        ),
        (["--model.pretrained=true"], "without network access give the float weights as a file with"),
        (
            ["--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.accelerator=cpu"],
            "runs data parallel with --trainer.strategy ddp (each process runs this command), not ddp_spawn",
        ),
    ],
)
def test_bad_input_gives_one_error_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", "-c", str(ROOT / "configs/digits/w4a4.yaml"), "--trainer.logger=false", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_missing_imagenet_root_from_the_shell(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "validate",
            "-c",
            str(ROOT / "configs/imagenet/deit_tiny_w4a4.yaml"),
            f"--data.init_args.root={tmp_path / 'nowhere'}",
            "--trainer.logger=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    assert torch.__version__  # same interpreter


def _fit_args(config: str, root, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        str(ROOT / config),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--model.calib.search_rounds=1",
        "--model.calib.num_images=16",
        "--data.init_args.calib_size=16",
        "--data.init_args.recon_size=48",
        "--model.recon.iters=3",
        "--model.recon.batch_size=8",
        "--model.fisher.rank=2",
        "--model.fisher.num_samples=16",
        *extra,
    ]


def _tensorboard_scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_end_to_end_then_resume_and_refuse_another_model(tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO)
    root = tmp_path / "fit"
    main(_fit_args("configs/digits/w4a4.yaml", root))
    metrics = json.loads((root / "metrics.json").read_text())
    for key in ("fp_top1", "calibrated_top1", "reconstructed_top1"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["reconstructed_top1"] > 80.0  # 3 steps per unit cannot wreck a W4/A4 model
    units = {"patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"}
    assert set(metrics["recon_output_mse"]) == units
    assert metrics["seconds"]["reconstruct"] > 0
    state, meta = read_artifact(root / "quantized.safetensors")
    assert meta["stage"] == "reconstructed" and meta["quant"]["w_bits"] == 4
    assert not any("alpha" in k for k in state)  # the rounding is folded into the weights
    assert (root / "recon_errors.png").stat().st_size > 1000
    # TensorBoard beside the artifacts (not nested), percentages as on the console, the settings used
    assert not (root / "lightning_logs").exists() and list((root / "version_0").glob("events.out.tfevents.*"))
    scalars = _tensorboard_scalars(root / "version_0")
    assert "hp_metric" not in scalars
    assert scalars["val/top1"][-1] == pytest.approx(metrics["reconstructed_top1"], abs=1e-3)
    hparams = (root / "version_0" / "hparams.yaml").read_text()
    assert "search_rounds: 1" in hparams and "calib: null" not in hparams
    assert "reconstructed" in caplog.text and "blocks.3: output MSE" in caplog.text
    assert "blocks.0 [2/6]" not in capsys.readouterr().out  # no bars when the trainer has none

    # a fit from the calibrated artifact reports where it starts
    caplog.clear()
    main(
        _fit_args(
            "configs/digits/w4a4.yaml",
            tmp_path / "again",
            f"--model.init_from={root / 'calibrated.safetensors'}",
        )
    )
    assert f"calibrated top-1 {metrics['calibrated_top1']:.2f}% (from --model.init_from)" in caplog.text

    # a second fit in the same folder resumes after the last unit: nothing left to train
    main(_fit_args("configs/digits/w4a4.yaml", root))
    again, _ = read_artifact(root / "quantized.safetensors")
    assert all(torch.equal(again[k], state[k]) for k in state)

    # the saved artifact validates on its own
    main(_validate_args("configs/digits/w4a4.yaml", root, "quantized.safetensors"))
    final = json.loads((root / "metrics.json").read_text())
    assert final["reconstructed_top1"] == pytest.approx(metrics["reconstructed_top1"], abs=1e-6)

    # a run of other bit-widths must not overwrite it
    with pytest.raises(SystemExit) as exc:
        main(_fit_args("configs/digits/w3a3.yaml", root))
    assert exc.value.code == 2
    assert "holds a run of another model" in capsys.readouterr().err


def test_help_describes_fimaq_and_offers_no_optimizer(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "fimaq: post-training quantization of timm vision transformers (ViT, DeiT, Swin" in " ".join(
        out.split()
    )
    listing = " ".join(out.split("Available subcommands:")[1].split())  # the lines re-wrapped
    assert "fit The whole PTQ: calibrate, reconstruct every unit" in listing
    assert "validate Top-1/top-5 of the model" in listing
    assert "Runs the full optimization routine" not in out  # Lightning's Trainer.fit docstring
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.calib" in out and "--optimizer" not in out and "--lr_scheduler" not in out


@pytest.mark.parametrize(
    "yaml_text, extra, expected",
    [
        (None, ["--model.recon.itres=5"], "error: model.recon.itres (on the command line): no such option"),
        (
            None,
            ["--model.quant.w_bits=x"],
            "error: model.quant.w_bits (on the command line): expected int, got 'x'",
        ),
        (
            "model:\n  recon: {iters: many}\n",
            [],
            "error: model.recon.iters (in {file}): expected int, got 'many'",
        ),
        (
            "model:\n  arch: [unclosed\n",
            [],
            "error: config {file}, line 3, column 1: YAML syntax error: expected",
        ),
    ],
)
def test_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys, yaml_text, extra, expected):
    config = ROOT / "configs/digits/w3a3.yaml"
    if yaml_text is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml_text)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(config), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # no usage block
    assert err[0].startswith(expected.format(file=config)), err[0]


def test_mode_strings_list_their_choices(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.recon.help", "ReconConfig"])
    assert "{mse,fisher_diag,fisher_lr,fisher_dplr,fisher_brecq,global_local}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(ROOT / "configs/digits/w3a3.yaml"), "--model.recon.loss=bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.recon.loss (on the command line): expected one of mse, fisher_diag, fisher_lr, "
        "fisher_dplr, fisher_brecq, global_local, got 'bogus'"
    )


def test_the_rounding_choice_parses_and_lists_its_choices(capsys):
    config = str(ROOT / "configs/digits/w3a3.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, "--model.recon.rounding", "ste", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["recon"]
    assert (printed["rounding"], printed["ste_iters"], printed["iters"]) == ("ste", None, 200)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", config, "--model.recon.rounding=sgd"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.recon.rounding (on the command line): expected one of adaround, ste, got 'sgd'"
    )
