"""The Python API as the README shows it: its "From Python" block, run with small settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fimaq.artifacts import read_artifact
from fimaq.errors import FimaqError

ROOT = Path(__file__).resolve().parents[1]


def readme_python() -> str:
    """The README's Python example, as printed there."""
    text = (ROOT / "README.md").read_text().split("## From Python", 1)[1]
    return text.split("```python", 1)[1].split("```", 1)[0]


def test_the_readme_python_example_runs_the_pipeline(tmp_path):
    code = readme_python()
    small = {  # seconds instead of minutes; everything else as printed
        "ReconConfig(iters=200)": "ReconConfig(iters=4, batch_size=8)",
        "FisherConfig(num_samples=256)": "FisherConfig(num_samples=16, rank=2, batch_size=8)",
        "DigitsDataModule(model_kwargs=kwargs)": "DigitsDataModule(model_kwargs=kwargs, recon_size=32)",
        '"lightning_logs/python_w3a3"': repr(str(tmp_path)),
    }
    for printed, used in small.items():
        assert printed in code, printed
        code = code.replace(printed, used)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fp_top1"] > 95 and metrics["calibrated_top1"] > 80 and metrics["reconstructed_top1"] > 80
    assert f"{metrics['reconstructed_top1']:.2f}" in proc.stdout  # the example prints it
    state, meta = read_artifact(tmp_path / "quantized.safetensors")
    assert meta["stage"] == "reconstructed" and all(torch.isfinite(t).all() for t in state.values())


def test_a_stage_refuses_a_data_module_without_the_ptq_tensors(tmp_path):
    import lightning as L

    from fimaq import Pipeline, QuantModel

    model = QuantModel(
        "deit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=8, depth=1, num_classes=10)
    )
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(FimaqError, match="is not a fimaq.data.PTQDataModule"):
        Pipeline(model, trainer).calibrate(L.LightningDataModule())
    with pytest.raises(FimaqError, match="needs --model.init_from a quantized artifact"):
        Pipeline(model, trainer).export(L.LightningDataModule())
