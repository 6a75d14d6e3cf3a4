"""Retrieval math: pure, batched, chunked functions with no I/O."""

from anomret.retrieval.softmax import SoftmaxRetriever, softmax_retrieve
from anomret.retrieval.spatial import (
    GlobalTopK,
    global_topk,
    multilayer_spatial_knn_scores,
    spatial_knn_scores,
)

__all__ = [
    "GlobalTopK",
    "SoftmaxRetriever",
    "global_topk",
    "multilayer_spatial_knn_scores",
    "softmax_retrieve",
    "spatial_knn_scores",
]
