"""A unit's training step compiled whole (``recon.compile``): one ``torch.compile``'d function from the
cached rows to the loss, backward included.

Traced: the QDrop mix of the cached inputs, the unit's forward pass with its straight-through fake
quantization (:func:`fimaq.quant.ste.fake_quant_ste_composed`) and AdaRound's soft weights
(:meth:`fimaq.quant.adaround.SoftRounding.weight_of`), the objective with its normalisers and Fisher
statistics, and the rounding penalty. Each is written out in plain operations when traced, so the
compiler derives one backward and fuses the elementwise work around the matrix products (Triton on a
GPU, C++ on the CPU). The QDrop masks are cut from the step's random bytes, drawn at once before the
call from the unit's stream: the same draws as the eager step's, so the two agree to float rounding.

What changes from step to step is a tensor: the rounding temperature and whether the penalty counts
come from per-step tables (a view per step: no transfer, no recompilation), and the step synchronises
with the host only where the eager one does (the logged values every ``log_every_n_steps``). A step
that records the loss normalisers (the first after a Fisher refresh) runs eagerly. A unit compiles
once, and once more when a refresh first grows the Fisher rank (the rank then becomes dynamic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fimaq.errors import FimaqError
from fimaq.quant.adaround import beta_schedule, round_regulariser_on

if TYPE_CHECKING:
    from fimaq.recon.module import BlockReconModule


class CompiledStep:
    """``(reconstruction loss, rounding penalty or None)`` of one step of ``module``'s unit, compiled."""

    def __init__(self, module: BlockReconModule) -> None:
        self.module = module
        torch.compiler.reset()  # a fresh cache per unit: earlier units' graphs never match this one's
        self.fn = torch.compile(self._step, mode=module.cfg.compile_mode, dynamic=None)
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rounding temperature and the penalty's on/off (1.0/0.0) of every step, on ``device``."""
        if self.tables is None or self.tables[0].device != device:
            cfg, iters = self.module.cfg, self.module.cfg.unit_iters
            betas = [beta_schedule(s, iters, cfg.warmup, cfg.beta_start, cfg.beta_end) for s in range(iters)]
            on = [float(round_regulariser_on(s, iters, cfg.warmup)) for s in range(iters)]
            self.tables = (torch.tensor(betas, device=device), torch.tensor(on, device=device))
        return self.tables

    def _step(self, x_fp, x_q, target, grad, features_fp, draws, beta, on):
        m = self.module
        if draws is not None:
            m.masks.traced_bytes(draws)
        mode = m.cfg.input_mode
        if mode == "qdrop":
            keep = m.masks(x_q.shape, m.cfg.drop_prob, x_q.device, x_q.dtype)
            inputs = torch.lerp(x_fp, x_q, keep)
        else:
            inputs = x_fp if mode == "rinp" else x_q
        pred = m.unit(inputs)
        features = (m.rest[0](pred), features_fp) if m.rest is not None else None
        rec = m.objective(pred, target, m.stats, grad, features=features)
        if m.soft_rounding is None:
            return rec, None
        return rec, on * m.soft_rounding.written_out_penalty(beta)

    def __call__(self, step: int, x_fp, x_q, target, grad, features_fp, draws):
        """The step's losses; ``draws``: its QDrop bytes (the masks are cut from them in the order the
        eager step draws them), or None (the compiler's own random numbers)."""
        beta, on = self._tables(target.device)
        try:
            return self.fn(x_fp, x_q, target, grad, features_fp, draws, beta[step], on[step])
        except FimaqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the compiler raises many kinds; one line names the option
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FimaqError(
                f"recon.compile: torch.compile failed on this machine ({reason[:200]}); run without it"
            ) from None
