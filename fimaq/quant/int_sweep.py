"""Exact integer products for ranking the candidates of one operand of a quantized product.

With both operands quantized, ``X_hat @ Y_hat = s_x s_y (L_x - z_x) @ (L_y - z_y)``: the product of
two small integer matrices, computed exactly by an int8 matrix multiply (int32 accumulation), several
times faster on CPU than the float32 product of the dequantized operands. Codes ``L - z`` lie in
``[-127, 127]`` below 8 bits; at 8 bits the codes are stored as ``L - 128`` and the offsets
``128 - z`` enter as row and column sums:

    (X + a)(Y + b) = X Y + b rowsum(X) 1^T + a 1 colsum(Y)^T + a b k

The integer product is exact in int32; converting it to float32 rounds only values above 2^24 (long
inner dimensions at 8 bits), by at most 6e-8 relative. The squared error against the float target is
then summed per candidate: the ranking is that of the exact errors up to float32 rounding of the
final scaling, far inside the searches' tie tolerance; near-ties are re-scored the reference's way.
"""

from __future__ import annotations

import torch

_INT_MM_OK: dict[str, bool] = {}


def int_matmul_available(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs on ``device``: CPU only (elsewhere the float path is fast and
    ``_int_mm`` has shape restrictions)."""
    if torch.device(device).type != "cpu":
        return False
    key = str(device)
    if key not in _INT_MM_OK:
        try:
            a = torch.ones(32, 32, dtype=torch.int8, device=device)
            _INT_MM_OK[key] = bool((torch._int_mm(a, a) == 32).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT_MM_OK[key] = False
    return _INT_MM_OK[key]


_STEP_ELEMENTS = 2**25  # product elements per step (bounds memory: int32 and float32 copies)


def _int8_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Codes minus zero point, ``clamp(round(x / s), -z, 2^b - 1 - z)``, as int8; at 8 bits the codes
    minus 128 instead (``z - 128`` added), which fit int8 whatever the zero point.

    ``buffers``: preallocated (float32, int8) tensors of the broadcast shape, reused across calls
    (fresh large allocations cost page faults on every step).
    """
    if buffers is None:
        shape = torch.Size(max(u, v) for u, v in zip(x.shape, scale.shape, strict=True))
        buffers = (torch.empty(shape, device=x.device), torch.empty(shape, dtype=torch.int8, device=x.device))
    t, codes = buffers
    torch.div(x, scale, out=t).round_()
    torch.maximum(t, -zero_point, out=t)
    torch.minimum(t, 2**bits - 1 - zero_point, out=t)
    if bits == 8:
        t.add_(zero_point - 128)
    return codes.copy_(t)


def product_sse(
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    y_qparams: tuple[torch.Tensor, torch.Tensor, int],
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Squared error ``||out - X_hat_c @ Y_hat||^2`` per (candidate, image, group), (P, n, G) float64.

    Args:
        x: the swept operand (n, G, r, k), float.
        y: the other operand (n, G, k, c) or one for all images (1, G, k, c), float; quantized with
            ``y_qparams`` = (scale, zero point, bits), scale and zero point per group (G,) or per
            group and column (G, c).
        out: the target (n, G, r, c).
        scales: candidate scales of ``x``, (P, G); ``zps`` their zero points.
        bits: bit-width of ``x`` (2..8).
    """
    n, g, r, k = x.shape
    c = y.shape[-1]
    num = scales.shape[0]
    y_scale, y_zp, y_bits = y_qparams
    y_scale, y_zp = y_scale.view(1, g, 1, -1), y_zp.view(1, g, 1, -1)
    y8 = _int8_codes(y, y_scale, y_zp, y_bits)
    shared = y8.shape[0] == 1
    y_off = None
    if y_bits == 8:  # a column of ones: the product's last column is then the row sums of X
        y_off = (128 - y_zp).to(torch.int32).view(g, 1, 1, -1)
        y_off = torch.cat([y_off.expand(g, 1, 1, c), torch.zeros_like(y_off[..., :1])], dim=-1)
        y8 = torch.cat([y8, torch.ones_like(y8[..., :1])], dim=-1)
    # column sums padded like the product (the ones column gets no offset), (n, G, 1, 1, cols)
    y_colsum = y8[..., :c].sum(dim=2, dtype=torch.int32).unsqueeze(2).unsqueeze(2)
    if y_bits == 8:
        y_colsum = torch.cat([y_colsum, torch.zeros_like(y_colsum[..., :1])], dim=-1)
    cols = y8.shape[-1]
    errors = torch.empty(num, n, g, dtype=torch.float64, device=x.device)
    step = max(1, min(num, _STEP_ELEMENTS // (g * r * c)))
    dev = x.device
    bufs = tuple(torch.empty(1, g, step, r, k, dtype=t, device=dev) for t in (torch.float32, torch.int8))
    prod_buf = torch.empty(g, step * r, cols, dtype=torch.int32, device=dev)
    val_buf = torch.empty(g * step * r * c, device=dev)
    for s0 in range(0, num, step):
        e0 = min(num, s0 + step)
        p = e0 - s0
        sc = scales[s0:e0].T.reshape(1, g, p, 1, 1)
        zp = zps[s0:e0].T.reshape(1, g, p, 1, 1)
        sigma = sc * y_scale.unsqueeze(2)
        x_off = (128 - zps[s0:e0]).T.to(torch.int32).reshape(g, p, 1, 1)
        buffers = tuple(b[:, :, :p] for b in bufs) if p < step else bufs
        prod = prod_buf[:, : p * r]
        val = val_buf[: g * p * r * c].view(1, g, p, r, c)
        for i in range(n):
            x8 = _int8_codes(x[i : i + 1].unsqueeze(2), sc, zp, bits, buffers)  # (1, G, p, r, k)
            flat = x8.view(g, p * r, k)
            for h in range(g):
                torch._int_mm(flat[h], y8[0 if shared else i, h], out=prod[h])
            full = prod.view(g, p, r, cols)  # the integer product; offsets added in int32 (contiguous)
            if bits == 8:
                full.add_(x_off * y_colsum[0 if shared else i])
            if y_bits == 8:
                rows = full[..., c:]  # row sums of X (unchanged by the add above)
                full.add_((rows + x_off * k if bits == 8 else rows) * y_off)
            exact = full[..., :c]
            val.copy_(exact.unsqueeze(0)).mul_(sigma)
            val.sub_(out[i : i + 1].unsqueeze(2))
            norms = torch.linalg.vector_norm(val.view(g, p, r * c), dim=-1)
            errors[s0:e0, i] = norms.double().pow_(2).T
    return errors


_GRAM_ROWS = 2**16  # rows per int32 partial Gram: 2^16 * 128^2 < 2^31


def code_gram(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Gram matrix ``X_hat^T X_hat`` (float64) of ``x`` (M, C) quantized per tensor, from its integer
    codes: ``s^2 (L - z)^T (L - z)``, exact in int32 per slice of rows, summed in float64 (equal to the
    Gram of the float32 fake-quantized values up to their float32 rounding, 6e-8 relative)."""
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    scale, zero_point = scale.reshape(1, 1), zero_point.reshape(1, 1)
    for r0 in range(0, x.shape[0], _GRAM_ROWS):
        codes = _int8_codes(x[r0 : r0 + _GRAM_ROWS], scale, zero_point, bits)
        part = torch._int_mm(codes.T.contiguous(), codes).double()
        if bits == 8:  # codes are L - 128; L - z = codes + a with a = 128 - z
            a = float(128 - zero_point.item())
            colsum = codes.sum(dim=0, dtype=torch.int64).double()
            part += a * (colsum.view(-1, 1) + colsum.view(1, -1)) + a * a * codes.shape[0]
        total += part
    return total * scale.double().pow(2)
