"""Per-layer calibration searches (docs/algorithm.md, sections 2.1-2.4: grids of 128 candidates, MSE
criteria, alternating rounds), on captured FP tensors. Each search picks its candidates through the
evaluators and the tie rule of :mod:`fimaq.quant.search`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.config import CalibConfig
from fimaq.layers import QuantConv2d, QuantLinear, QuantMatMul
from fimaq.quant import grids, matmul_sweep, search
from fimaq.quant.fake_quant import fake_quant
from fimaq.quant.log_quantizer import ADALOG_STEPS, LogQuantizer, log_fake_quant
from fimaq.quant.search import fq


def _pick(grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """grid (P, rows, 1), idx (rows,) -> (rows, 1)."""
    return grid.gather(0, idx.view(1, -1, 1)).squeeze(0)


def _same(q1, q2) -> bool:
    """Whether two (scale, zero point) pairs are identical (searches on identical inputs repeat)."""
    if not (isinstance(q1, tuple) and isinstance(q2, tuple)):
        return q1 is q2
    return all(torch.equal(u, v) for u, v in zip(q1, q2, strict=True))


def search_linear(
    w: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w_bits: int | None,
    a_bits: int | None,
    cfg: CalibConfig,
    num_images: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Section 2.1: per-row weight and per-tensor input qparams of ``y = x W^T + b``.

    ``x`` (M, in) and ``y`` (M, out) hold ``num_images`` images' tokens. Returns
    ((w_scale (rows, 1), w_zp), (a_scale (), a_zp ())), None where that side stays FP.
    """
    chunk = cfg.candidate_chunk
    rows_per_chunk = max(1, cfg.images_per_chunk) * max(1, x.shape[0] // num_images)
    wq = aq = None
    if w_bits is not None:
        ws, wz = grids.weight_grid(w, w_bits, cfg.eq_n)
        wi = search.self_sse(w, ws[..., 0].T, wz[..., 0].T, w_bits, "w_quantizer")
        wq = (_pick(ws, wi), _pick(wz, wi))
    if a_bits is not None:
        x_sorted = search.sorted_input(x)
        a_s, a_z = grids.activation_grid(x, a_bits, cfg.eq_n, sorted_values=x_sorted)
        ai = int(
            search.self_sse(
                x.reshape(1, -1), a_s.view(1, -1), a_z.view(1, -1), a_bits, "a_quantizer", x_sorted
            )[0]
        )
        del x_sorted
        aq = (a_s[ai], a_z[ai])
    w_used_for = a_used_for = object()  # the other side's qparams each search last ran with
    for _ in range(cfg.search_rounds):
        if w_bits is not None and not _same(aq, w_used_for):
            w_used_for = aq
            x_hat = fake_quant(x, aq[0], aq[1], a_bits) if aq is not None else x
            wi = search.WeightOutputError(w, bias, x_hat, y).best(ws, wz, w_bits, chunk, "w_quantizer")
            wq = (_pick(ws, wi), _pick(wz, wi))
        if a_bits is not None and not _same(wq, a_used_for):
            a_used_for = wq
            w_hat = fake_quant(w, wq[0], wq[1], w_bits) if wq is not None else w
            ai = search.act_output_sse(
                x, w_hat, bias, y, a_s, a_z, a_bits, chunk, rows_per_chunk, "a_quantizer"
            )
            aq = (a_s[ai], a_z[ai])
        if w_bits is None or a_bits is None:
            break  # nothing left to alternate with
    return wq, aq


def fold_layernorm(
    norm: nn.LayerNorm,
    layer: QuantLinear,
    x: torch.Tensor,
    bits: int,
    cfg: CalibConfig,
    co_readers: Sequence[QuantLinear] = (),
) -> torch.Tensor:
    """Section 2.2: per-input-channel qparams by input MSE, folded into the LayerNorm and the linear
    (and into the other linears reading the same LayerNorm output, ``co_readers`` **[fimaq]**).

    The float function is unchanged; returns the captured input transformed like the LayerNorm output.
    """
    x_sorted = search.sorted_input(x, channel_wise=True)
    scales, zps = grids.activation_grid(x, bits, cfg.eq_n, channel_wise=True, sorted_values=x_sorted)
    idx = search.self_sse(x.T.contiguous(), scales, zps, bits, "channels", x_sorted)
    del x_sorted
    s_c = scales.gather(1, idx.view(-1, 1)).squeeze(1)
    zp_c = zps.gather(1, idx.view(-1, 1)).squeeze(1)
    s_t = s_c.mean().view(1)
    zp_t = zp_c.mean().round().view(1)
    r = s_c / s_t
    beta = (-zp_c * s_c) / r - (-zp_t * s_t)
    with torch.no_grad():
        norm.weight.div_(r)
        norm.bias.copy_(norm.bias / r - beta)
        for reader in (layer, *co_readers):
            reader.weight.mul_(r.view(1, -1))
            reader.bias.add_(torch.mm(reader.weight, beta.view(-1, 1)).view(-1))
    return x / r - beta


def calibrate_linear(
    layer: QuantLinear,
    norm: nn.LayerNorm | None,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: CalibConfig,
    num_images: int,
    co_readers: Sequence[QuantLinear] = (),
) -> None:
    """Calibrate one QuantLinear from its captured FP input ``x`` (M, in) and output ``y`` (M, out);
    a fold into ``norm`` also compensates ``co_readers``, the other linears reading its output."""
    w_bits, a_bits = layer.w_quantizer.bits, layer.a_quantizer.bits
    if norm is not None and a_bits is not None and cfg.fold_layernorm:
        x = fold_layernorm(norm, layer, x, a_bits, cfg, co_readers)
    wq, aq = search_linear(layer.weight.detach(), layer.bias.detach(), x, y, w_bits, a_bits, cfg, num_images)
    if wq is not None:
        layer.w_quantizer.set_qparams(*wq)
    if aq is not None:
        layer.a_quantizer.set_qparams(*aq)


def calibrate_conv(layer: QuantConv2d, x: torch.Tensor, y: torch.Tensor, cfg: CalibConfig) -> None:
    """Section 2.4: per-output-channel bounds by output MSE, then coordinate descent on each bound.

    The convolution is a linear map on unfolded patches, so candidates are scored with the row-wise
    Gram search of the linear layers (one Gram matrix for every sweep).
    """
    bits = layer.w_quantizer.bits
    if bits is None:
        return
    w2d = layer.weight.detach().reshape(layer.out_channels, -1)
    upper, lower = grids.conv_weight_bounds(w2d, cfg.eq_n)
    upper, lower = upper[: cfg.eq_n], lower[: cfg.eq_n]  # the reference never evaluates the last (1.0) bound

    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    out = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    objective = search.WeightOutputError(w2d, layer.bias.detach(), patches, out)

    def best(up: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        s, z = grids.bounds_to_qparams(up, lo, bits)
        return objective.best(s, z, bits, cfg.candidate_chunk, "w_quantizer")

    idx = best(upper, lower)
    iu = il = idx
    # with an FP input there is no activation step to alternate with: the reference stops after one round
    rounds = cfg.search_rounds if layer.a_quantizer.bits is not None else min(1, cfg.search_rounds)
    for _ in range(rounds):
        il = best(_pick(upper, iu).unsqueeze(0), lower)
        iu = best(upper, _pick(lower, il).unsqueeze(0))
    scale, zp = grids.bounds_to_qparams(_pick(upper, iu), _pick(lower, il), bits)
    layer.w_quantizer.set_qparams(scale, zp)


LOG_GRID_SCALES = 32  # scales per exponent in one period of a log grid (section 2.5)


def calibrate_log_matmul(
    layer: QuantMatMul, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: CalibConfig
) -> None:
    """Section 2.5: attention probabilities ``A`` on a log grid. Its (scale, exponent) per head by the
    product's error with ``B`` in FP, then ``B``'s joint bounds with ``A`` quantized, ``A`` again
    against the quantized ``B``, then ``B``'s coordinate descent (section 2.3's sweeps)."""
    q, bb = layer.A_quantizer, layer.B_quantizer.bits
    steps = ADALOG_STEPS if q.kind == "adalog" else (1.0,)
    ipc = max(1, cfg.images_per_chunk, cfg.batch_size)

    def search_a(b_hat: torch.Tensor) -> torch.Tensor:
        scale, step = matmul_sweep.log_grid_search(a, b_hat, out, q.bits, steps, LOG_GRID_SCALES, ipc)
        q.set_log_qparams(scale.view(1, -1, 1, 1), step.view(1, -1, 1, 1))
        return log_fake_quant(a, q.scale.detach(), q.step, q.bits)

    a_hat = search_a(b)
    if bb is None:
        return
    up, lo = grids.matmul_operand_bounds(b, cfg.eq_n)
    up, lo = up[: cfg.eq_n], lo[: cfg.eq_n]
    heads = a.shape[1]
    cols = torch.arange(heads)
    sel = [torch.full((heads,), cfg.eq_n - 1, dtype=torch.long) for _ in range(2)]  # (upper, lower) index

    def sweep(mode: str) -> None:
        u, lw = up, lo
        if mode == "upper":
            lw = lo.gather(0, sel[1].view(1, -1)).expand_as(up)
        elif mode == "lower":
            u = up.gather(0, sel[0].view(1, -1)).expand_as(lo)
        s, z = grids.bounds_to_qparams(u, lw, bb)
        idx = matmul_sweep.matmul_sweep(
            a_hat,
            b,
            out,
            s,
            z,
            bb,
            "B",
            cfg.candidate_chunk,
            max(1, cfg.images_per_chunk),
            None,
            "B_quantizer",
        )
        if mode in ("joint", "upper"):
            sel[0] = idx
        if mode in ("joint", "lower"):
            sel[1] = idx

    def b_qparams() -> tuple[torch.Tensor, torch.Tensor]:
        return grids.bounds_to_qparams(up[sel[0], cols], lo[sel[1], cols], bb)

    sweep("joint")
    if cfg.search_rounds:
        s, z = b_qparams()
        a_hat = search_a(fq(b, s.view(1, -1, 1, 1), z.view(1, -1, 1, 1), bb))
    for _ in range(cfg.search_rounds):
        sweep("lower")
        sweep("upper")
    s, z = b_qparams()
    layer.B_quantizer.set_qparams(s.view(1, -1, 1, 1), z.view(1, -1, 1, 1))


def calibrate_matmul(
    layer: QuantMatMul, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: CalibConfig
) -> None:
    """Section 2.3: per-head operand bounds, joint sweeps for A then B, then coordinate descent."""
    if isinstance(layer.A_quantizer, LogQuantizer) and layer.A_quantizer.bits is not None:
        calibrate_log_matmul(layer, a, b, out, cfg)
        return
    ab, bb = layer.A_quantizer.bits, layer.B_quantizer.bits
    if ab is None and bb is None:
        return
    chunk, ipc = cfg.candidate_chunk, max(1, cfg.images_per_chunk)
    bounds = {}
    for op, x in (("A", a), ("B", b)):
        up, lo = grids.matmul_operand_bounds(x, cfg.eq_n)
        bounds[op] = (up[: cfg.eq_n], lo[: cfg.eq_n])  # candidate eq_n is never evaluated
    bits = {"A": ab, "B": bb}
    heads = a.shape[1]
    start = torch.full((heads,), cfg.eq_n - 1, dtype=torch.long)
    sel = {"A": [start.clone(), start.clone()], "B": [start.clone(), start.clone()]}  # (upper idx, lower idx)

    def qparams(op: str) -> tuple[torch.Tensor, torch.Tensor]:
        up, lo = bounds[op]
        iu, il = sel[op]
        u = up.gather(0, iu.view(1, -1))[0]
        lw = lo.gather(0, il.view(1, -1))[0]
        return grids.bounds_to_qparams(u, lw, bits[op])

    memo: dict[tuple, int] = {}  # per-head sweep results: a sweep's outcome for a head depends only on
    # that head's fixed bound and the other operand's bounds, so repeated coordinate-descent steps are reused

    def sweep(op: str, mode: str) -> None:
        if bits[op] is None:
            return
        other = "B" if op == "A" else "A"
        fixed = {"joint": None, "upper": sel[op][1], "lower": sel[op][0]}[mode]
        keys = [
            (
                h,
                op,
                mode,
                -1 if fixed is None else int(fixed[h]),
                *((-1, -1) if bits[other] is None else (int(sel[other][0][h]), int(sel[other][1][h]))),
            )
            for h in range(heads)
        ]
        todo = torch.tensor([h for h in range(heads) if keys[h] not in memo], dtype=torch.long)
        if todo.numel():
            up, lo = (t[:, todo] for t in bounds[op])
            if mode == "upper":
                lo = lo.gather(0, sel[op][1][todo].view(1, -1)).expand_as(up)
            elif mode == "lower":
                up = up.gather(0, sel[op][0][todo].view(1, -1)).expand_as(lo)
            s, z = grids.bounds_to_qparams(up, lo, bits[op])
            other_q = None
            if bits[other] is not None:
                o_s, o_z = qparams(other)
                other_q = (o_s[todo], o_z[todo], bits[other])
            idx = matmul_sweep.matmul_sweep(
                a[:, todo],
                b[:, todo],
                out[:, todo],
                s,
                z,
                bits[op],
                op,
                chunk,
                ipc,
                other_q,
                f"{op}_quantizer",
            )
            for j, h in enumerate(todo.tolist()):
                memo[keys[h]] = int(idx[j])
        idx = torch.tensor([memo[k] for k in keys], dtype=torch.long)
        if mode in ("joint", "upper"):
            sel[op][0] = idx
        if mode in ("joint", "lower"):
            sel[op][1] = idx

    sweep("A", "joint")
    sweep("B", "joint")
    for _ in range(cfg.search_rounds):
        for op in ("A", "B"):
            sweep(op, "lower")
            sweep(op, "upper")
    for op, quantizer in (("A", layer.A_quantizer), ("B", layer.B_quantizer)):
        if bits[op] is not None:
            s, z = qparams(op)
            quantizer.set_qparams(s.view(1, -1, 1, 1), z.view(1, -1, 1, 1))
