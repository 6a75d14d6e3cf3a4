"""Encoder outputs: computed in one place (:class:`FeatureExtractor`), cached on disk (:class:`FeatureStore`)."""

from anomret.features.extractor import FeatureExtractor
from anomret.features.store import FeatureStore, image_key

__all__ = ["FeatureExtractor", "FeatureStore", "image_key"]
