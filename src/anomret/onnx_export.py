"""The encoder and scoring head of a loaded model as one ONNX graph, checked against the PyTorch path.

The graph is the model's own scoring functions (``encoder`` → ``score`` → ``combine``, what ``forward``
runs on decoded images) traced for a fixed memory: input ``image``, a normalised ``[B, 3, S, S]`` batch
(the encoder's preprocessing, which stays outside the graph), outputs ``anomaly_map`` ``[B, H, W]`` and
``image_score`` ``[B]``. The export is refused unless onnxruntime reproduces PyTorch to ``tolerance``.

Sound for MRAD-TF and MRAD-FT: their labelled memory is small (a few hundred MB at most for the real
benchmarks) and becomes constants of the graph. Not for RAD, whose memory of normal patch grids is read
memory-mapped, image by image after a top-K retrieval (16 GiB for MVTec at 448 px, beyond one protobuf
graph's 2 GiB), nor for MRAD-CLIP, which runs the CLIP text tower with per-image prompt biases.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

EXPORTABLE = ("mrad_tf", "mrad_ft")
TOLERANCE = 1e-4
OPSET = 17

_REFUSED = {
    "rad": (
        "RAD's memory of normal patch grids is read memory-mapped, image by image after a top-K retrieval; "
        "as graph constants it would exceed ONNX's 2 GiB for real datasets"
    ),
    "mrad_clip": "MRAD-CLIP runs the CLIP text tower with per-image prompt biases on every image",
}


class OnnxExportError(ValueError):
    """A model that is not exported to ONNX (and why)."""


class ScoringGraph(nn.Module):
    """``images → (anomaly_map, image_score)`` through the model's own scoring functions."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scored = self.model.combine(self.model.score(self.model.encoder(images)))
        return scored.anomaly_map, scored.image_score


def export_onnx(
    detector: Any, path: str | Path, *, tolerance: float = TOLERANCE, seed: int = 0
) -> dict[str, Any]:
    """Write ``detector``'s model to ``path`` and check it; returns what the manifest records."""
    model = detector.model
    if model.method not in EXPORTABLE:
        reason = _REFUSED.get(model.method, "it is not among the methods checked for export")
        raise OnnxExportError(f"{model.method} is not exported to ONNX: {reason}. Export without --onnx.")
    model.to("cpu")
    model.on_predict_start()
    size = model.encoder.preprocess.crop
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, size, size, generator=generator)
    graph = ScoringGraph(model).eval()
    path = Path(path)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    # PyTorch's fused attention kernel has no ONNX form; the plain one computes the same attention.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            _export(graph, example, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    check = torch.randn(3, 3, size, size, generator=generator)  # another batch size than the traced one
    with torch.no_grad():
        expected = graph(check)  # the prediction path as it runs, fused attention included
    differences = parity(path, check, expected)
    if max(differences.values()) > tolerance:
        path.unlink(missing_ok=True)
        raise OnnxExportError(
            f"the ONNX graph of {model.method} differs from PyTorch by {differences} (> {tolerance}); not written"
        )
    return {
        "file": path.name,
        "opset": OPSET,
        "input": f"image [B, 3, {size}, {size}] normalised",
        "max_abs_diff": differences,
    }


def _export(graph: nn.Module, example: Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # Shapes read in Python (map size, top-k count, the memory's size) are constants of this graph by
        # design: it is traced for one image size and one memory. The batch size stays free.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _trace(graph, example, path)


def _trace(graph: nn.Module, example: Tensor, path: Path) -> None:
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["anomaly_map", "image_score"],
        dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "image_score": {0: "batch"}},
        opset_version=OPSET,
    )


def parity(path: Path, images: Tensor, expected: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Max |Δ| between onnxruntime's outputs for ``images`` and PyTorch's ``expected``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "image_score"], {"image": images.numpy()})
    return {
        "anomaly_map": float(np.abs(maps - expected[0].numpy()).max()),
        "image_score": float(np.abs(scores - expected[1].numpy()).max()),
    }
