"""Lightning callbacks of the reconstruction: when to refresh the Fisher statistics, and the bar."""

from fimaq.callbacks.fisher import FisherRefresh
from fimaq.callbacks.progress import UnitProgressBar

__all__ = ["FisherRefresh", "UnitProgressBar"]
