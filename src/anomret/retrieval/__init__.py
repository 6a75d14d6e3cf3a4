"""Retrieval math: pure, batched, chunked functions with no I/O."""

from anomret.retrieval.softmax import SoftmaxRetriever, softmax_retrieve

__all__ = ["SoftmaxRetriever", "softmax_retrieve"]
