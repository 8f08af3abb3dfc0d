"""LampQ mixed precision: the ILP against brute force, the Fisher trace against an analytic one,
type normalisation, bit plans, and search_bits + fit from the command line."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimaq.config import MixedPrecisionConfig
from fimaq.errors import FimaqError
from fimaq.mixed_precision import (
    BitPlan,
    fisher_traces,
    quantization_errors,
    smallest_budget,
    solve_allocation,
    type_normalise,
)

ROOT = Path(__file__).resolve().parents[1]


def _brute_force(cost, sizes, bits, budget, allowed):
    best, best_cost = None, np.inf
    for pick in itertools.product(range(len(bits)), repeat=len(sizes)):
        if not all(allowed[i, k] for i, k in enumerate(pick)):
            continue
        used = sum(bits[k] * sizes[i] for i, k in enumerate(pick))
        if used > budget * sum(sizes) + 1e-9:
            continue
        total = sum(cost[i, k] for i, k in enumerate(pick))
        if total < best_cost - 1e-12:
            best, best_cost = [bits[k] for k in pick], total
    return best, best_cost


@pytest.mark.parametrize("seed", range(8))
def test_ilp_matches_brute_force_and_respects_the_budget(seed):
    rng = np.random.default_rng(seed)
    bits = [2, 3, 4, 6, 8]
    n = 5
    sizes = rng.integers(10, 200, n).tolist()
    # errors fall with bits; sensitivities differ per layer
    cost = rng.uniform(0.1, 10, (n, 1)) * np.sort(rng.uniform(0, 1, (n, len(bits))), axis=1)[:, ::-1]
    allowed = np.ones((n, len(bits)), dtype=bool)
    allowed[0, 0] = False  # layer 0 needs at least 3 bits
    allowed[1, -1] = False  # layer 1 at most 6
    budget = float(rng.uniform(3.0, 5.0))
    got = solve_allocation(cost, sizes, bits, budget, allowed)
    expected, expected_cost = _brute_force(cost, sizes, bits, budget, allowed)
    got_cost = sum(cost[i, bits.index(b)] for i, b in enumerate(got))
    assert got_cost == pytest.approx(expected_cost, rel=1e-6)
    assert sum(b * s for b, s in zip(got, sizes, strict=True)) <= budget * sum(sizes) + 1e-6
    assert got[0] >= 3 and got[1] <= 6


def test_an_infeasible_budget_names_the_smallest_feasible_one():
    allowed = np.array([[False, True, True], [True, True, True]])
    sizes, bits = [100, 300], [2, 3, 4]
    floor = smallest_budget(sizes, bits, allowed)
    assert floor == pytest.approx((3 * 100 + 2 * 300) / 400)
    with pytest.raises(FimaqError, match=r"smallest feasible budget is 2\.25"):
        solve_allocation(np.ones((2, 3)), sizes, bits, 2.0, allowed)


def test_fisher_trace_matches_the_analytic_per_sample_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5))
    x = torch.randn(6, 4)
    targets = F.softmax(torch.randn(6, 5), -1)
    T = 2.0
    traces = fisher_traces(net, {"fc1": net[0], "fc2": net[2]}, x, targets=targets, temperature=T)
    w1, b1, w2, b2 = (p.detach().double() for p in net.parameters())
    exp1 = exp2 = 0.0
    for xi, p in zip(x.double(), targets.double(), strict=True):
        pre = w1 @ xi + b1
        h = pre.clamp(min=0)
        z = w2 @ h + b2
        dz = (torch.softmax(z / T, -1) - p) / T  # d KL(p || softmax(z/T)) / dz
        dw2 = torch.outer(dz, h)
        dh = (w2.T @ dz) * (pre > 0)
        dw1 = torch.outer(dh, xi)
        exp1 += dw1.pow(2).sum().item() / len(x)
        exp2 += dw2.pow(2).sum().item() / len(x)
    assert traces["fc1"] == pytest.approx(exp1, rel=1e-5)
    assert traces["fc2"] == pytest.approx(exp2, rel=1e-5)
    assert all(p.grad is None for p in net.parameters())
    # micro-batches of 2: the squared norm of the averaged gradient of each pair
    pairs = fisher_traces(net, {"fc2": net[2]}, x, targets=targets, temperature=T, micro_batch=2)
    assert pairs["fc2"] < traces["fc2"]


def test_type_normalisation_gives_every_type_mean_one():
    traces = {"a.qkv": 2.0, "b.qkv": 6.0, "a.fc1": 0.5, "b.fc1": 1.5, "a.fc2": 10.0}
    types = {k: k.split(".")[1] for k in traces}
    omega = type_normalise(traces, types)
    for t in ("qkv", "fc1", "fc2"):
        vals = [omega[k] for k in traces if types[k] == t]
        assert np.mean(vals) == pytest.approx(1.0)
    assert omega["b.qkv"] / omega["a.qkv"] == pytest.approx(3.0)
    assert type_normalise(traces, types, "none") == traces


def test_quantization_error_falls_with_bits():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    errs = quantization_errors(w, [2, 3, 4, 8])
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)) and errs[-1] < 0.05 * errs[0]


def test_bit_plan_round_trips_and_refuses_another_model(tmp_path):
    plan = BitPlan(
        arch="deit_tiny_patch16_224",
        model_kwargs={"img_size": 32, "depth": 4},
        budget=3.0,
        layers={
            "blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 3},
            "blocks.0.mlp.fc1": {"w_bits": 2, "a_bits": 3},
        },
        sensitivity={"blocks.0.attn.qkv": 1.5, "blocks.0.mlp.fc1": 0.5},
        average_w_bits=2.9,
        rounds=[{"blocks.0.attn.qkv": 4, "blocks.0.mlp.fc1": 2}],
    )
    path = plan.save(tmp_path / "plan.yaml")
    assert BitPlan.load(path) == plan
    with pytest.raises(FimaqError, match="was made for deit_tiny_patch16_224"):
        BitPlan.load(path).check_model("vit_small_patch16_224", {})
    bad = path.read_text().replace("w_bits: 4", "w_bits: 11")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(FimaqError, match="outside the supported range"):
        BitPlan.load(tmp_path / "bad.yaml")
    with pytest.raises(FimaqError, match="not a fimaq bit plan"):
        (tmp_path / "other.yaml").write_text("a: 1\n")
        BitPlan.load(tmp_path / "other.yaml")


@pytest.mark.parametrize(
    "cfg, message",
    [
        (MixedPrecisionConfig(candidates=[]), "candidate bit-widths are empty"),
        (MixedPrecisionConfig(min_bits=5, max_bits=3), "min_bits=5 > max_bits=3"),
        (MixedPrecisionConfig(candidates=[9]), "candidate bits must be an integer between 2 and 8"),
        (MixedPrecisionConfig(candidates=[2, 3], min_bits=4), "no candidate bit-width"),
        (MixedPrecisionConfig(budget=0), "budget must be average weight bits"),
        (MixedPrecisionConfig(normalise="layer"), "normalise must be one of"),
        (MixedPrecisionConfig(layer_bits={"blocks.0.attn.qkv": [4]}), r"must be \[min, max\]"),
        (MixedPrecisionConfig(candidates=[2, 3], layer_bits={"x": [4, 8]}), "leaves none of"),
    ],
)
def test_bad_mixed_precision_settings(cfg, message):
    with pytest.raises(FimaqError, match=message):
        cfg.validate()


def test_per_layer_bounds_reach_the_allocation():
    import conftest

    from fimaq.config import CalibConfig, QuantSpec
    from fimaq.mixed_precision import search_bit_plan

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def search(layer_bits):
        cfg = MixedPrecisionConfig(budget=3.0, rounds=1, micro_batch=4, layer_bits=layer_bits)
        calib = CalibConfig(num_images=8, eq_n=32, search_rounds=1)
        spec = QuantSpec(w_bits=3, a_bits=4)
        return search_bit_plan(
            lambda: conftest.tiny_model("vit"), spec, images, cfg, calib, "tiny", {}, False
        )

    plan = search({"blocks.1.mlp.fc2": [6, 8]})
    assert plan.layers["blocks.1.mlp.fc2"]["w_bits"] >= 6
    assert plan.average_w_bits <= 3.0 + 1e-9
    with pytest.raises(FimaqError, match="not allocated"):
        search({"blocks.7.mlp.fc2": [6, 8]})


def test_search_bits_then_fit_with_the_plan(tmp_path):
    from fimaq.artifacts import read_artifact
    from fimaq.cli import main

    root = tmp_path / "mp"
    common = [
        "-c",
        str(ROOT / "configs/digits/w3a3.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--model.calib.search_rounds=1",
        "--model.calib.num_images=16",
        "--data.init_args.calib_size=16",
    ]
    main(["search_bits", *common, "--plan.budget=3.5", "--plan.rounds=1", "--plan.micro_batch=4"])
    plan = BitPlan.load(root / "bit_plan.yaml")
    sizes = {"qkv": 192 * 576, "proj": 192 * 192, "fc1": 192 * 768, "fc2": 768 * 192}
    used = sum(b["w_bits"] * sizes[n.rsplit(".", 1)[-1]] for n, b in plan.layers.items())
    assert used <= 3.5 * sum(sizes[n.rsplit(".", 1)[-1]] for n in plan.layers) + 1e-6
    assert len(plan.layers) == 16 and plan.average_w_bits <= 3.5
    assert (root / "bit_plan.png").stat().st_size > 1000
    assert json.loads((root / "metrics.json").read_text())["bit_plan_average_w_bits"] == plan.average_w_bits

    fit_root = tmp_path / "fit"
    main(
        [
            "fit",
            *common[:2],
            f"--trainer.default_root_dir={fit_root}",
            *common[3:],
            f"--model.bit_plan={root / 'bit_plan.yaml'}",
            "--data.init_args.recon_size=32",
            "--model.recon.iters=2",
            "--model.recon.batch_size=8",
            "--model.fisher.rank=1",
            "--model.fisher.num_samples=8",
        ]
    )
    state, meta = read_artifact(fit_root / "quantized.safetensors")
    assert meta["quant"]["overrides"] == plan.overrides()
    qkv = plan.layers["blocks.0.attn.qkv"]["w_bits"]
    w = state["blocks.0.attn.qkv.weight"]
    s = state["blocks.0.attn.qkv.w_quantizer.scale"]
    codes = torch.round(w / s)
    spans = codes.max(1).values - codes.min(1).values
    assert spans.max() <= 2**qkv - 1  # every row fits the planned bit-width
