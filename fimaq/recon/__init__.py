"""Block-wise reconstruction: unit caches, Fisher estimator, losses, BlockReconModule, driver loop."""

from fimaq.recon.driver import STATE_FILE, reconstruct_model
from fimaq.recon.report import ReconReport
from fimaq.recon.units import Unit, recon_units

__all__ = ["STATE_FILE", "ReconReport", "Unit", "reconstruct_model", "recon_units"]
