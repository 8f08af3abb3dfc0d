"""Calibration: capture each unit's FP activations once, then search every layer's qparams."""

from fimaq.calib.calibrate import CALIB_STATE_FILE, CalibReport, calibrate_model

__all__ = ["CALIB_STATE_FILE", "CalibReport", "calibrate_model"]
