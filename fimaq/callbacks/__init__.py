"""Lightning callbacks of the reconstruction: when to refresh the Fisher statistics, the step clock and
the bar."""

from fimaq.callbacks.clock import StepClock
from fimaq.callbacks.fisher import FisherRefresh
from fimaq.callbacks.progress import ProgressBar, UnitProgressBar

__all__ = ["FisherRefresh", "ProgressBar", "StepClock", "UnitProgressBar"]
