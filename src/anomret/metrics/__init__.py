"""Exact anomaly-detection metrics: functional (``functional``), torchmetrics-style (``classes``), the
per-category evaluator (``evaluator``, ``gathered`` across processes) and the results they produce
(``results``: ``results.json``, ``image_scores.csv``, the console table; torch-free, so reports read them
without loading the models). Nothing is imported here: importing a submodule costs only what it needs."""
