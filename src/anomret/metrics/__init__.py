"""Exact anomaly-detection metrics (functional and torchmetrics-style) and result reports."""
