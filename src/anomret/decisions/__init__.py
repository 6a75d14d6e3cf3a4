"""From scores to decisions: thresholds calibrated on explicit images, saved with the model, applied to
every output (see :mod:`anomret.metrics.thresholds` for the math and
:mod:`anomret.decisions.calibration` for where the calibration images come from)."""
