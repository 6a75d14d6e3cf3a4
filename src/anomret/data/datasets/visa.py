"""VisA (Visual Anomaly), indexed straight from its published ``split_csv/1cls.csv``.

The CSV (columns ``object, split, label, image, mask``; label ``normal``/``anomaly``) names every
image and mask relative to ROOT, so nothing is copied or re-binarised: VisA masks hold small class
ids (1, 2, ...), which :func:`anomret.data.io.read_mask` binarises at > 0 when they are read.

The MVTec-style copy written by the official ``prepare_data.py`` (``VisA_pytorch/1cls``) is
accepted too, when ROOT points at it.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    check_exists,
    mvtec_style_dirs,
    read_mvtec_category,
)
from anomret.data.errors import InvalidSampleError
from anomret.data.meta import Meta

log = logging.getLogger(__name__)

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip

SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")


def read_visa(root: Path, spec: DatasetSpec) -> Meta:
    csv_path = root / SPLIT_CSV
    if csv_path.is_file():
        return _read_split_csv(root, csv_path, spec)
    converted = [child for child in mvtec_style_dirs(root) if child.name in VISA_CATEGORIES]
    if converted:
        builder = MetaBuilder(root)
        for folder in converted:
            read_mvtec_category(builder, folder, folder.name, dataset=spec.name, normal_dirs=("good",))
        log.info("%s: read the MVTec-style copy (VisA_pytorch/1cls) in %s", spec.name, root)
        return builder.result(spec)
    raise spec.layout_error(root, f"{csv_path} does not exist")


def _read_split_csv(root: Path, csv_path: Path, spec: DatasetSpec) -> Meta:
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        if any(column not in header for column in _COLUMNS):
            raise spec.layout_error(
                root, f"{csv_path} has columns {header}, expected {list(_COLUMNS)} (the published 1cls.csv)"
            )
        rows = [
            {key.strip().lower(): (value or "").strip() for key, value in row.items() if key}
            for row in reader
        ]

    builder = MetaBuilder(root)
    referenced: list[Path] = []
    for line, row in enumerate(rows, start=2):
        category, split, label = row["object"], row["split"].lower(), row["label"].lower()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise InvalidSampleError(
                f"{spec.name}: {csv_path} line {line}: split must be train/test and label normal/anomaly, "
                f"got split={row['split']!r} label={row['label']!r}.\n"
                "Fix: restore the published split_csv/1cls.csv."
            )
        image = root / row["image"]
        mask = root / row["mask"] if label == "anomaly" and row["mask"] else None
        if label == "anomaly" and mask is None:
            raise InvalidSampleError(
                f"{spec.name}: {csv_path} line {line}: anomalous image {image} has no mask "
                f"(expected e.g. {root / category / 'Data' / 'Masks' / 'Anomaly' / (image.stem + '.png')}).\n"
                "Fix: restore the published split_csv/1cls.csv."
            )
        if mask is not None and mask.stem.lower() != image.stem.lower():
            # The CSV pairing is authoritative, but a stem mismatch means it was edited by hand.
            log.warning("%s: %s line %d pairs image %s with mask %s", spec.name, csv_path, line, image, mask)
        referenced.append(image)
        if mask is not None:
            referenced.append(mask)
        builder.add(split, category, image, mask, int(label == "anomaly"))
    check_exists(referenced, dataset=spec.name, source=str(csv_path))
    unknown = sorted(
        {category for split in builder.meta.values() for category in split} - set(VISA_CATEGORIES)
    )
    if unknown:
        log.warning("%s: %s lists categories that are not VisA's: %s", spec.name, csv_path, unknown)
    return builder.result(spec)


SPECS = (
    DatasetSpec(
        name="visa",
        title="VisA (Visual Anomaly)",
        description=(
            "VisA: 12 object categories (PCBs, capsules, macaroni, ...) with pixel masks. Indexed from the "
            "published 1-class split (split_csv/1cls.csv): train = normal images, test = normal + anomalous. "
            "Defect types are not named (specie_name is empty), as in AnomalyCLIP."
        ),
        layout=(
            "ROOT/\n"
            "  split_csv/1cls.csv                 (object,split,label,image,mask)\n"
            "  candle/Data/Images/Normal/0000.JPG\n"
            "  candle/Data/Images/Anomaly/000.JPG\n"
            "  candle/Data/Masks/Anomaly/000.png\n"
            "  capsules/ ... (12 categories)\n"
            "or the MVTec-style copy made by prepare_data.py: ROOT/<category>/{train/good,test/good,test/bad,"
            "ground_truth/bad}\n"
        ),
        download=(
            "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar "
            "(see github.com/amazon-science/spot-diff; ROOT is the extracted folder holding split_csv/)"
        ),
        reader=read_visa,
        categories=VISA_CATEGORIES,
        has_masks=True,
        has_train_split=True,
    ),
)
