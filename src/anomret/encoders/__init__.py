"""Frozen image encoders that produce ``Features`` (see ``base``)."""
