"""Reconstruction losses on a unit's output (docs/algorithm.md, section 4), as pure functions plus the
normalised objective that the reconstruction step minimises.

Every output is flattened to ``D = tokens x channels``; ``e_b = |y_hat_b - y_b|``. With Fisher
statistics ``G`` (rows ``g_j``), ``Delta`` (rows ``delta_j``) and ``M = (Delta Delta^T)^-1``:

* ``diag``: ``mean_{b,d} e_bd^2 g_bar_d`` with ``g_bar = mean_j g_j``;
* ``lowrank``: ``mean_b a_b^T M a_b`` with ``a_b = G e_b``;
* ``dplr``: ``p1 lowrank / lowrank_0 + p2 diag / diag_0`` (values at the last refresh), i.e.
  ``mean_b e_b^T F e_b`` with ``F = p1/lowrank_0 G^T M G + p2/(D diag_0) diag(g_bar)``.

``global_local`` [fimaq]: ``global / global_0 + w * mse / mse_0`` with ``global`` the squared error of
the penultimate features (the unit's output through the frozen float rest of the model) summed over
features and averaged over the batch, ``mse`` the unit's own output error, ``w`` = ``local_weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fimaq.errors import FimaqError


@dataclass
class FisherStats:
    """The statistics a refresh produces; ``cols`` selects the low-rank part's columns of D."""

    G: torch.Tensor  # (j, D)  mean |dL/dy| per refresh
    Delta: torch.Tensor  # (j, D)  mean |y_hat - y| per refresh
    M: torch.Tensor  # (j, j)  (Delta_c Delta_c^T + ridge)^-1 on the low-rank columns
    cols: slice = field(default_factory=lambda: slice(None))
    condition: float = 1.0

    @property
    def rank(self) -> int:
        return self.G.shape[0]

    @property
    def g_bar(self) -> torch.Tensor:
        return self.G.mean(0)


def inverse_gram(delta: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """``(Delta Delta^T + ridge * tr/j * I)^-1`` in float64, and the condition number of the Gram."""
    d = delta.double()
    gram = d @ d.T
    j = gram.shape[0]
    if not bool(gram.trace() > 0):  # Delta = 0 (a unit whose output quantization leaves unchanged,
        # e.g. a SwinV2 block with timm's zero-initialised post-norms): the low-rank term is 0 for any M
        return torch.zeros_like(gram).to(delta.dtype), 1.0
    cond = float(torch.linalg.cond(gram)) if j > 1 else 1.0
    if ridge > 0:
        gram = gram + ridge * gram.trace() / j * torch.eye(j, dtype=gram.dtype, device=gram.device)
    try:
        inv = torch.linalg.inv(gram)
    except RuntimeError as exc:  # singular even with the ridge (e.g. an all-zero error row)
        raise FimaqError(f"the Fisher low-rank Gram matrix is singular ({exc}); raise fisher.ridge") from None
    return inv.to(delta.dtype), cond


def flat_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|pred - target|`` flattened to ``(batch, D)``."""
    return (pred - target).abs().reshape(pred.shape[0], -1)


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimension 1 (tokens), averaged over the rest."""
    return (pred - target).pow(2).sum(1).mean()


def diag_loss(e: torch.Tensor, g_bar: torch.Tensor) -> torch.Tensor:
    """``mean_{b,d} e^2 g_bar``."""
    return (e.pow(2) * g_bar).mean()


def lowrank_loss(e: torch.Tensor, stats: FisherStats) -> torch.Tensor:
    """``mean_b (G e_b)^T M (G e_b)`` on the low-rank columns."""
    a = e[:, stats.cols] @ stats.G[:, stats.cols].T  # (B, j)
    return ((a @ stats.M) * a).sum(1).mean()


class DplrTerms(torch.autograd.Function):
    """``(lowrank_loss, diag_loss)`` of ``e = |pred - target|`` in a few passes over the output, with
    the gradient to ``pred`` only (the same values as the composed functions, to float rounding).

    Forward: ``d = pred - target``, ``a = |d_c| G_c^T`` (``c``: the low-rank columns), ``lowrank =
    mean_b a_b^T M a_b``, ``diag = mean_{b,k} d_bk^2 g_bar_k``. Backward: ``dL/dpred = 2 w_d / (B D)
    g_bar d + w_l / B sign(d_c) (a (M + M^T)) G_c``.
    """

    @staticmethod
    def forward(ctx, pred, target, G, M, g_bar, cols):
        with torch.autocast(pred.device.type, enabled=False):  # in the dtype of pred (float32 at least)
            return DplrTerms._forward(ctx, pred, target, G, M, g_bar, cols)

    @staticmethod
    def _forward(ctx, pred, target, G, M, g_bar, cols):
        b = pred.shape[0]
        # into a contiguous buffer: the patch embedding's output is a transposed view, and the
        # difference in its layout would cost a copy to flatten
        d = torch.sub(pred, target, out=torch.empty(pred.shape, dtype=pred.dtype, device=pred.device))
        d = d.reshape(b, -1)
        Gc = G[:, cols].to(d.dtype)
        e = d[:, cols].abs()
        a = e @ Gc.T  # (B, j)
        Mt = M.to(d.dtype)
        lowrank = ((a @ Mt) * a).sum() / b
        sq = torch.mul(d, d, out=e) if e.shape == d.shape else d * d  # e is no longer needed
        diag = (sq @ g_bar.to(d.dtype)).sum() / d.numel()
        ctx.save_for_backward(d, a, Gc, Mt, g_bar)
        ctx.cols, ctx.shape = cols, pred.shape
        return lowrank, diag

    @staticmethod
    def backward(ctx, g_low, g_diag):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        d, a, Gc, Mt, g_bar = ctx.saved_tensors
        b = d.shape[0]
        with torch.autocast(d.device.type, enabled=False):
            grad = torch.mul(d, g_bar.to(d.dtype) * (2 * g_diag / d.numel()))
            t = (a @ (Mt + Mt.T) * (g_low / b)) @ Gc  # dL/de on the low-rank columns
            grad[:, ctx.cols].addcmul_(torch.sgn(d[:, ctx.cols]), t)
        return grad.reshape(ctx.shape), None, None, None, None, None


def dplr_terms(
    pred: torch.Tensor, target: torch.Tensor, stats: FisherStats
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lowrank_loss(e, stats), diag_loss(e, stats.g_bar))`` with ``e = |pred - target|``, fused."""
    return DplrTerms.apply(pred, target, stats.G, stats.M, stats.g_bar, stats.cols)


class DplrLoss(torch.autograd.Function):
    """The normalised ``fisher_dplr`` objective ``p1 lowrank / lowrank_0 + p2 diag / diag_0`` of a batch,
    with the weights folded into the statistics (:class:`FoldedDplr`): about a dozen operations
    forward and backward together (the gradient to ``pred`` only; the values of :func:`dplr_terms`
    and the normalisers to float rounding).

    Forward: ``d = pred - target``, ``a = |d_c| G_c^T``, ``loss = (sum_b a_b M' a_b + sum d^2 g') / B``
    with ``M' = p1 M / lowrank_0`` and ``g' = p2 g_bar / (D diag_0)``. Backward: ``dL/dpred = (2 g' d +
    sign(d_c) (a (M' + M'^T)) G_c) / B``.
    """

    @staticmethod
    def forward(ctx, pred, target, folded: FoldedDplr):
        with torch.autocast(pred.device.type, enabled=False):  # in the dtype of pred (float32 at least)
            b = pred.shape[0]
            d = torch.sub(pred, target, out=torch.empty(pred.shape, dtype=pred.dtype, device=pred.device))
            d = d.reshape(b, -1)
            cols = folded.cols
            e = torch.abs(d if cols == slice(None) else d[:, cols])
            a = e @ folded.G.T  # (B, j)
            am = torch.addmm(folded.zero, a, folded.M, beta=0, alpha=1.0 / b)
            dg2 = torch.addcmul(folded.zero, d, folded.g, value=2.0 / b)  # 2 g' d / B
            low = torch.dot(am.reshape(-1), a.reshape(-1))
            loss = torch.add(low, torch.dot(dg2.reshape(-1), d.reshape(-1)), alpha=0.5)
        ctx.save_for_backward(d, a, dg2)
        ctx.folded, ctx.shape = folded, pred.shape
        return loss

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        d, a, dg2 = ctx.saved_tensors
        folded, b = ctx.folded, d.shape[0]
        with torch.autocast(d.device.type, enabled=False):
            t = torch.addmm(folded.zero, a, folded.M_sym, beta=0, alpha=1.0 / b) @ folded.G  # dL/de (cols)
            cols = folded.cols
            if cols == slice(None):
                grad = torch.addcmul(dg2, torch.sgn(d), t)
            else:
                grad = dg2.clone()
                grad[:, cols].addcmul_(torch.sgn(d[:, cols]), t)
            grad = grad.mul_(g)
        return grad.reshape(ctx.shape), None, None


@dataclass
class FoldedDplr:
    """The statistics of a refresh with the ``fisher_dplr`` weights and normalisers folded in."""

    G: torch.Tensor  # (j, D_c) the low-rank columns of G
    M: torch.Tensor  # (j, j)  p1 M / lowrank_0
    M_sym: torch.Tensor  # M + M^T
    g: torch.Tensor  # (D,)   p2 g_bar / (D diag_0)
    cols: slice
    zero: torch.Tensor

    @classmethod
    def of(cls, stats: FisherStats, p1: float, p2: float, lowrank0, diag0) -> FoldedDplr:
        """Fold ``p1 / lowrank0`` into ``M`` and ``p2 / (D diag0)`` into ``g_bar`` (normalisers: tensors)."""
        M = stats.M * (p1 / lowrank0)
        g_bar = stats.g_bar
        g = g_bar * (p2 / (diag0 * g_bar.numel()))
        return cls(stats.G[:, stats.cols].contiguous(), M, M + M.T, g, stats.cols, g.new_zeros(()))


def brecq_loss(pred: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``mean((y_hat - y)^2 g^2)`` with per-sample gradients ``g`` (BRECQ's Fisher diagonal)."""
    d = (pred - target).reshape(pred.shape[0], -1)
    return (d.pow(2) * grad.reshape_as(d).pow(2)).mean()


def kl_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(pred))`` (batchmean), the head unit's loss."""
    return F.kl_div(F.log_softmax(pred.float(), -1), F.softmax(target.float(), -1), reduction="batchmean")


def implied_fisher(
    stats: FisherStats, d: int, p1: float, p2: float, lr0: float, diag0: float
) -> torch.Tensor:
    """The dense ``D x D`` matrix F with ``dplr = mean_b e_b^T F e_b`` (for tests and inspection)."""
    G = torch.zeros(stats.rank, d, dtype=torch.float64)
    G[:, stats.cols] = stats.G[:, stats.cols].double()
    low = G.T @ stats.M.double() @ G
    return p1 / lr0 * low + p2 / (d * diag0) * torch.diag(stats.g_bar.double())


class ReconObjective:
    """The per-step reconstruction loss of one unit, with normalisers re-recorded after each refresh.

    Args:
        kind: ``mse`` | ``fisher_diag`` | ``fisher_lr`` | ``fisher_dplr`` | ``fisher_brecq`` |
            ``global_local`` | ``kl``.
        p1: weight of the low-rank term (``fisher_dplr``).
        p2: weight of the diagonal term (``fisher_dplr``).
        local_weight: weight of the unit's own output error (``global_local``).
    """

    def __init__(self, kind: str, p1: float = 1.0, p2: float = 1.0, local_weight: float = 1.0) -> None:
        self.kind, self.p1, self.p2, self.local_weight = kind, p1, p2, local_weight
        self.norms: dict[str, torch.Tensor] = {}
        self.folded: tuple[FisherStats, FoldedDplr] | None = None  # fisher_dplr, once normalised
        self.share: float | None = None
        self.reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def uses_fisher(self) -> bool:
        return self.kind in ("fisher_diag", "fisher_lr", "fisher_dplr")

    @property
    def recording(self) -> bool:
        """Whether the next call records the normalisers (after a reset; the head's KL has none)."""
        return self.kind != "kl" and not self.norms

    def reset(self) -> None:
        """Record the normalisers again on the next call (after a Fisher refresh)."""
        self.norms.clear()
        self.folded = None

    def _normalised(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name not in self.norms:
            norm = value.detach().clone()
            if self.share is not None and self.reduce_sum is not None:  # the global batch's value
                norm = self.reduce_sum(norm * self.share)
            self.norms[name] = norm.clamp_min(torch.finfo(value.dtype).tiny)
        return value / self.norms[name]

    def __call__(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        stats: FisherStats | None = None,
        grad: torch.Tensor | None = None,
        share: float | None = None,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The loss of this batch; ``share``: this rank's fraction of a data-parallel global batch and
        ``reduce_sum`` the sum over ranks (normalisers are then recorded on the whole global batch);
        ``features``: (penultimate features from the unit's output, the float model's), ``global_local``."""
        self.share, self.reduce_sum = share, reduce_sum
        if pred.dtype in (torch.float16, torch.bfloat16):
            pred = pred.float()  # losses are computed in float32 at least (autocast-friendly)
        target = target.to(pred.dtype)
        if self.kind == "kl":
            return kl_loss(pred, target)
        if self.kind == "mse":
            return self._normalised("mse", mse_loss(pred, target))
        if self.kind == "global_local":
            if features is None:
                raise FimaqError("loss global_local needs the penultimate features: none were computed")
            feats, feats_fp = features
            glob = self._normalised("global", mse_loss(feats.float(), feats_fp.to(torch.float32)))
            return glob + self.local_weight * self._normalised("mse", mse_loss(pred, target))
        if self.kind == "fisher_brecq":
            return self._normalised("brecq", brecq_loss(pred, target, grad))
        if stats is None:
            raise FimaqError(f"loss {self.kind} needs Fisher statistics: none were computed")
        if self.kind == "fisher_diag":
            return self._normalised("diag", diag_loss(flat_error(pred, target), stats.g_bar))
        if self.kind == "fisher_lr":
            return self._normalised("lr", lowrank_loss(flat_error(pred, target), stats))
        if torch.compiler.is_compiling():  # the written-out terms (the compiler derives the backward)
            e = flat_error(pred, target)
            low, diag = lowrank_loss(e, stats), diag_loss(e, stats.g_bar)
            return self.p1 * self._normalised("lr", low) + self.p2 * self._normalised("diag", diag)
        if self.folded is None or self.folded[0] is not stats:  # (a refresh resets both)
            low, diag = dplr_terms(pred, target, stats)  # (records the normalisers)
            loss = self.p1 * self._normalised("lr", low) + self.p2 * self._normalised("diag", diag)
            norms = self.norms["lr"], self.norms["diag"]
            self.folded = (stats, FoldedDplr.of(stats, self.p1, self.p2, *norms))
            return loss
        return DplrLoss.apply(pred, target.to(pred.dtype), self.folded[1])
