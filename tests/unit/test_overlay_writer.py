"""OverlayWriter: which test images it keeps (in bounded memory) and what it writes for the report page."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from anomret.callbacks import OverlayWriter, _Kept, _merge, map_box, select_overlays
from anomret.data.batch import Batch
from anomret.data.samples import Sample
from anomret.encoders.base import Preprocess

PREPROCESS = Preprocess(resize=16, crop=12, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# Category "a": normal and anomalous scores, in dataset order.
NORMAL = [0.1, 0.5, 0.3, 0.9, 0.2]
ANOMALOUS = [0.8, 0.2, 0.6, 0.95, 0.4]


def _samples(root: Path) -> list[Sample]:
    samples = []
    for label, scores in ((0, NORMAL), (1, ANOMALOUS)):
        for number, _ in enumerate(scores):
            folder = "good" if label == 0 else "crack"
            image = root / "a" / folder / f"{number}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(image)  # 30 wide, 20 high
            mask = None
            if label:
                mask = root / "a" / "ground_truth" / f"{number}_mask.png"
                mask.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.zeros((20, 30), np.uint8)
                pixels[5:15, 10:20] = 255
                Image.fromarray(pixels).save(mask)
            samples.append(Sample(image, mask, "a", label, "test", "t", folder))
    return samples


def _run(writer: OverlayWriter, samples: list[Sample], batch_size: int = 3) -> None:
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(test_samples=samples, preprocess=PREPROCESS),
        loggers=[],
        is_global_zero=True,
    )
    writer.on_test_start(trainer, None)
    scores = [*NORMAL, *ANOMALOUS]
    for start in range(0, len(samples), batch_size):
        rows = list(range(start, min(start + batch_size, len(samples))))
        maps = torch.stack([torch.full((6, 6), scores[i]) for i in rows])
        batch = Batch.unlabelled(torch.tensor(rows), image_path=[str(samples[i].image_path) for i in rows])
        batch.category = [samples[i].category for i in rows]
        batch.label = torch.tensor([samples[i].label for i in rows])
        batch.mask = torch.zeros(len(rows), 6, 6)
        outputs = {"anomaly_map": maps, "image_score": torch.tensor([scores[i] for i in rows])}
        writer.on_test_batch_end(trainer, None, outputs, batch, 0)
        held = sum(len(heap) for heap in writer._pools["a"].values())
        assert held <= 3 * writer.n_per_category  # bounded however many images the category has
    writer.on_test_epoch_end(trainer, None)


def test_keeps_likeliest_false_positives_and_negatives_then_clear_detections(tmp_path):
    samples = _samples(tmp_path / "data")
    writer = OverlayWriter(str(tmp_path / "run"), n_per_category=4)
    _run(writer, samples)
    rows = list(csv.DictReader((tmp_path / "run" / "overlays" / "index.csv").open()))
    scores = [round(float(row["score"]), 6) for row in rows]  # float32 scores
    # Taken in turn: highest normal (0.9), lowest anomalous (0.2), highest anomalous (0.95), next normal (0.5);
    # files numbered by score.
    assert scores == [0.95, 0.9, 0.5, 0.2]
    assert [row["label"] for row in rows] == ["1", "0", "0", "1"]
    sizes = set()
    for row in rows:
        path = tmp_path / "run" / row["file"]
        assert path.is_file() and row["file"].startswith("overlays/a/")
        assert Path(row["image"]).is_file()
        with Image.open(path) as panel:
            # The image's own resolution: two 30x20 views side by side, a colour bar, a caption above.
            assert panel.size[0] > 2 * 30 and panel.size[1] > 20
            sizes.add(panel.size)
    assert len(sizes) == 1  # normal and anomalous panels alike: W&B shows a category's panels as one set


def test_the_ground_truth_outline_comes_from_the_mask_file_at_full_resolution(tmp_path):
    samples = _samples(tmp_path / "data")
    writer = OverlayWriter(str(tmp_path / "run"), n_per_category=3)
    _run(writer, samples)
    rows = list(csv.DictReader((tmp_path / "run" / "overlays" / "index.csv").open()))
    anomalous = next(row for row in rows if row["label"] == "1")
    panel = np.asarray(Image.open(tmp_path / "run" / anomalous["file"]).convert("RGB"))
    plain = panel[-20:, :30]
    green = (plain == (0, 255, 0)).all(axis=-1)
    ys, xs = np.nonzero(green)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 14, 10, 19)  # the mask's own box


def test_round_robin_selection_fills_from_the_other_pools_when_one_runs_dry():
    def kept(index: int, score: float, label: int) -> _Kept:
        return _Kept(index, np.zeros((2, 2), np.float16), None, None, f"/x/{index}.png", score, label)

    anomalous = [kept(i, s, 1) for i, s in enumerate([0.1, 0.5, 0.9])]
    pools = {"highest_normal": [], "lowest_anomalous": anomalous, "highest_anomalous": anomalous}
    chosen = select_overlays(pools, 3)
    assert [k.index for k in chosen] == [0, 2, 1]  # lowest, highest, then the next lowest; no repeats


def test_rows_seen_by_two_processes_are_kept_once():
    item = _Kept(7, np.zeros((2, 2), np.float16), None, None, "/x/7.png", 0.4, 0)
    share = ({"a": {"highest_normal": [((0.4, -7), item)]}}, {"a": [0.0, 1.0]})
    other = ({"a": {"highest_normal": [((0.4, -7), item)]}}, {"a": [-1.0, 0.5]})
    pools, ranges = _merge([share, other], size=4)
    assert [k.index for k in pools["a"]["highest_normal"]] == [7]
    assert ranges["a"] == [-1.0, 1.0]


def test_map_box_is_the_encoders_centre_crop_in_the_original_pixels():
    # 16 px square resize, 12 px centre crop: 2 px margins of 16, scaled to a 32x64 (w x h) image.
    assert map_box(32, 64, PREPROCESS) == (4, 8, 28, 56)
    assert map_box(30, 20, Preprocess(16, 16, (0, 0, 0), (1, 1, 1))) == (0, 0, 30, 20)
