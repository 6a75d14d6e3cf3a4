"""Retrieval math: pure, batched, chunked functions with no I/O."""
