"""Saved thresholds, the evaluator's metrics at them, the service's upload checks and batching, and the ONNX
export's parity on the tiny encoder (no processes)."""

from __future__ import annotations

import asyncio
import io
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, precision_score, recall_score

from anomret.decisions.calibration import CalibrationError, CalibrationSettings, fit_thresholds
from anomret.decisions.record import Thresholds, ThresholdsError
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.metrics.thresholds import fpr_threshold
from anomret.serving import Batcher, Limits, Rejected, decode_image


def _thresholds(**changes) -> Thresholds:
    values = dict(
        image=0.5,
        pixel=0.25,
        method="fpr",
        calibration={"images": "holdout"},
        image_range=(0.1, 0.9),
        pixel_range=(0.0, 1.0),
        model={"method": "m", "encoder": "e", "bank": "b", "trained": "t", "settings": "s"},
    )
    return Thresholds(**{**values, **changes})


def test_thresholds_round_trip_and_refuse_another_model(tmp_path):
    saved = _thresholds(normalize=True)
    loaded = Thresholds.load(saved.save(tmp_path / "thresholds.json"))
    assert loaded == saved
    assert loaded.label(0.5) == "anomalous" and loaded.label(0.4999) == "normal"
    assert loaded.normalized_score(0.5) == 0.5
    assert loaded.mask(np.array([[0.2, 0.25]])).tolist() == [[False, True]]
    loaded.check_model(dict(saved.model))
    with pytest.raises(ThresholdsError, match=r"memory bank, scoring settings .* differ"):
        loaded.check_model({**saved.model, "bank": "other", "settings": "other"})
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ThresholdsError, match="not an anomret thresholds file"):
        Thresholds.load(tmp_path / "bad.json")
    with pytest.raises(ThresholdsError, match="does not exist"):
        Thresholds.load(tmp_path / "missing.json")


def test_calibration_settings_refuse_what_cannot_give_honest_thresholds():
    assert not CalibrationSettings.from_config({}).calibrates
    with pytest.raises(CalibrationError, match=r"calibration\.foo"):
        CalibrationSettings.from_config({"foo": 1})
    with pytest.raises(CalibrationError, match="labelled anomalous images"):
        CalibrationSettings.from_config({"method": "f1", "images": "folder", "folder": "x"})
    with pytest.raises(CalibrationError, match="set one of them"):
        CalibrationSettings.from_config({"method": "fpr", "images": "holdout", "thresholds": "t.json"})
    with pytest.raises(CalibrationError, match=r"needs calibration\.dataset"):
        CalibrationSettings.from_config({"method": "f1", "images": "dataset"})
    with pytest.raises(CalibrationError, match=r"holdout must be a share"):
        CalibrationSettings.from_config({"method": "fpr", "images": "holdout", "holdout": 1.0})


def test_fit_thresholds_uses_normal_images_for_fpr_and_labels_for_f1():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 10)
    scores = (rng.normal(size=40) + 2 * labels).astype(np.float32)
    maps = rng.random((40, 4, 4)).astype(np.float32)
    masks = np.zeros((40, 4, 4), bool)
    masks[30:, :2] = True
    maps[masks] += 1
    settings = CalibrationSettings(method="fpr", images="dataset", target_fpr=0.1, pixel_target_fpr=0.05)
    image, pixel, achieved = fit_thresholds(settings, scores, labels, maps, masks)
    assert image == fpr_threshold(scores[:30], 0.1) and pixel == fpr_threshold(maps[:30].reshape(-1), 0.05)
    assert achieved["image_fpr"] <= 0.1 and achieved["pixel_fpr"] <= 0.05
    f1_settings = CalibrationSettings(method="f1", images="dataset", dataset={"root": "x"})
    image, pixel, achieved = fit_thresholds(f1_settings, scores, labels, maps, masks)
    assert achieved["image_f1"] == pytest.approx(f1_score(labels, scores >= image))
    assert achieved["pixel_f1"] == pytest.approx(f1_score(masks.reshape(-1), maps.reshape(-1) >= pixel))


def test_evaluator_reports_precision_recall_f1_at_the_thresholds():
    rng = np.random.default_rng(1)
    evaluator = CategoryEvaluator(metrics=["image_auroc", "pixel_auroc"])
    evaluator.set_thresholds(0.3, 0.6)
    labels = torch.tensor([0, 1] * 10)
    scores = torch.tensor(rng.random(20), dtype=torch.float32)
    maps = torch.tensor(rng.random((20, 8, 8)), dtype=torch.float32)
    masks = torch.zeros(20, 8, 8)
    masks[1::2, :4] = 1
    evaluator.update(["a"] * 10 + ["b"] * 10, scores, labels, maps, masks)
    result = evaluator.compute()
    assert result.metrics[-6:] == (
        "image_precision",
        "image_recall",
        "image_f1",
        "pixel_precision",
        "pixel_recall",
        "pixel_f1",
    )
    for name, rows in (("a", slice(0, 10)), ("b", slice(10, 20))):
        truth, flagged = labels[rows].numpy(), scores[rows].numpy() >= np.float32(0.3)
        assert result.per_category[name]["image_precision"] == pytest.approx(precision_score(truth, flagged))
        assert result.per_category[name]["image_recall"] == pytest.approx(recall_score(truth, flagged))
        pixel_truth = masks[rows].numpy().reshape(-1) > 0
        pixel_flagged = maps[rows].numpy().reshape(-1) >= np.float32(0.6)
        assert result.per_category[name]["pixel_f1"] == pytest.approx(f1_score(pixel_truth, pixel_flagged))
    assert not math.isnan(result.mean["image_f1"])


# --------------------------------------------------------------------------------------------- uploads
def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def test_uploads_are_checked_before_and_while_decoding():
    limits = Limits(max_pixels=10_000, min_side=16)
    assert decode_image(_png(Image.new("L", (20, 30), 7)), limits).shape == (30, 20, 3)
    assert decode_image(_png(Image.new("RGBA", (20, 20))), limits).shape == (20, 20, 3)
    cases = [
        (b"", 400, "empty"),
        (b"GIF89a not really", 400, "not an image"),
        (_png(Image.new("RGB", (1, 1))), 400, "at least 16"),
        (_png(Image.new("L", (200, 200))), 413, "over the limit of 10000"),
        (_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:-40], 400, "truncated"),
    ]
    for data, status, reason in cases:
        with pytest.raises(Rejected, match=reason) as raised:
            decode_image(data, limits)
        assert raised.value.status == status


def test_the_batcher_runs_waiting_requests_in_one_pass_and_answers_failures_to_each():
    seen: list[list[int]] = []
    gate = threading.Event()

    def predict(items: list[int]) -> list[int]:
        gate.wait(5)
        seen.append(list(items))
        if -1 in items:
            raise RuntimeError("broken input")
        return [item * 10 for item in items]

    async def scenario() -> tuple[list[int], str]:
        batcher = Batcher(predict, max_batch_size=4, batch_timeout_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the first pass has started and waits at the gate
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        answers = [await first, *[await r for r in rest]]
        failed = asyncio.ensure_future(batcher.submit(-1))
        try:
            await failed
            message = ""
        except RuntimeError as error:
            message = str(error)
        batcher.stop()
        return answers, message

    answers, message = asyncio.run(scenario())
    assert answers == [10, 20, 30, 40]
    assert seen[:2] == [[1], [2, 3, 4]]  # the three that waited during the first pass went in together
    assert message == "broken input"


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize("method", ["mrad_tf", "mrad_ft"])
def test_onnx_graph_matches_the_pytorch_path(compose_config, tmp_path, method):
    pytest.importorskip("onnxruntime")
    from anomret.assembly import build, build_model
    from anomret.memory.labeled import LabeledMemoryBank
    from anomret.onnx_export import export_onnx

    cfg = compose_config([f"+experiment=demo_{method}", "encoder.image_size=64"])
    encoder = build(cfg.encoder)
    model = build_model(cfg, encoder, evaluate=False)
    generator = torch.Generator().manual_seed(0)
    bank = LabeledMemoryBank(
        image_keys=torch.randn(12, encoder.cls_dim, generator=generator),
        image_values=torch.eye(2)[torch.arange(12) % 2],
        patch_keys=torch.randn(30, encoder.patch_dim, generator=generator),
        patch_values=torch.eye(2)[torch.arange(30) % 2],
        metadata={"build": {"layer": encoder.layers[-1]}},
    )
    model.attach_memory(bank, {"path": "random", "kind": "labeled", "identity": "random"})
    model.eval()
    info = export_onnx(SimpleNamespace(model=model), tmp_path / "model.onnx")
    assert max(info["max_abs_diff"].values()) <= 1e-4


def test_rad_is_not_exported_and_says_why(tmp_path):
    from anomret.onnx_export import OnnxExportError, export_onnx

    with pytest.raises(OnnxExportError, match="memory-mapped"):
        export_onnx(SimpleNamespace(model=SimpleNamespace(method="rad")), tmp_path / "m.onnx")
