"""Every method of ``conf/method`` runs end to end with a tiny encoder of each family (CLIP and timm), or
is refused before any compute when the pairing cannot work; a new method or encoder family is covered by
default. One category per source keeps each run to seconds."""

from __future__ import annotations

import math

import pytest

from anomret.config import config_dir
from anomret.contracts import ConfigError
from anomret.pipeline import run

METHODS = sorted(path.stem for path in (config_dir() / "method").glob("*.yaml"))
TINY_ENCODERS = ("tiny_clip", "tiny_vit")
# Per method: the demo recipe it is shown with, and what keeps a tiny run tiny.
EXTRA = {
    "mrad_clip": ["trainer.max_epochs=2"],
    "rad": ["retrieval.cap_k=true"],
}


@pytest.mark.parametrize("encoder", TINY_ENCODERS)
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_with_a_tiny_encoder_or_is_refused_before_compute(
    compose_config, tmp_path, method, encoder
):
    experiment = "demo" if method == "mrad_tf" else f"demo_{method}"
    overrides = [
        f"+experiment={experiment}",
        f"encoder={encoder}",
        "logger=none",
        "callbacks.overlays=null",
        "dataset.categories=[pill]",
        "aux_dataset.categories=[nut]",
        *EXTRA.get(method, []),
    ]
    cfg = compose_config(overrides)
    try:
        result = run(cfg, fit=True)
    except ConfigError as error:
        assert method == "mrad_clip" and encoder == "tiny_vit", error  # the only pairing that cannot work
        assert "text tower" in str(error)
        assert not (tmp_path / ".cache").exists(), "refused before anything was encoded or cached"
        return
    assert list(result.per_category) == ["pill"]
    values = result.per_category["pill"]
    assert all(math.isfinite(values[metric]) for metric in ("image_auroc", "pixel_auroc")), values
    assert (tmp_path / "run" / "results.json").is_file()
