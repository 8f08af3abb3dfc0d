"""Calibration: capture each unit's FP activations once, then search every layer's qparams."""

from fimaq.calib.calibrate import CalibReport, calibrate_model

__all__ = ["CalibReport", "calibrate_model"]
