"""The reference implementation's calibration, reproduced on the oracle folder (skipped without it).

Calibrating the whole model takes minutes; the test runs the patch embedding and the first block
(every kind of search: conv, folded qkv/fc1, proj/fc2, both matmuls) at W4/A4 and requires the same
scales (1e-5) and zero points as the reference. ``benchmarks/oracle_calibration.py`` runs it all.
"""

import pytest
import torch

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.oracle import ORACLE_ARCH, ORACLE_KWARGS, compare_qparams, oracle_dir

ORACLE = oracle_dir()
pytestmark = pytest.mark.skipif(ORACLE is None, reason="oracle folder (../shared/oracle) not present")


def test_first_units_match_reference_w4a4():
    from safetensors.torch import load_file

    inputs = load_file(str(ORACLE / "inputs.safetensors"))
    ref = load_file(str(ORACLE / "official_calib_w4a4.safetensors"))
    model = create_fp_model(ORACLE_ARCH, str(ORACLE / "model.safetensors"), model_kwargs=ORACLE_KWARGS)
    quantize_model(model, QuantSpec(w_bits=4, a_bits=4))
    report = calibrate_model(
        model, inputs["calib"], CalibConfig(), progress=False, units=["patch_embed.proj", "blocks.0"]
    )
    prefixes = tuple(report.layer_seconds)
    assert len(prefixes) == 7
    ref_part = {k: v for k, v in ref.items() if k.startswith(prefixes)}
    diff = compare_qparams(model.state_dict(), ref_part)
    assert diff.groups > 2000
    assert diff.zero_point_mismatch == {}
    assert diff.scale_mismatch == {}
    state = model.state_dict()
    for key in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        torch.testing.assert_close(state[key], ref[key], rtol=1e-5, atol=1e-6)  # the LayerNorm fold
