"""anomret: retrieval-based visual anomaly detection (MRAD, RAD) with Lightning and Hydra."""

__version__ = "0.1.0"
