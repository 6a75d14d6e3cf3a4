"""The image-level medical sets: HeadCT, BrainMRI and Br35H (category ``brain`` in MRAD/AnomalyCLIP).

None has pixel masks: every record has ``mask_path=""`` and only image metrics apply. All images
go to the test split (zero-shot protocol).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    find_dir,
    list_images,
    read_converted_single,
)
from anomret.data.errors import InvalidSampleError, format_paths
from anomret.data.meta import Meta

log = logging.getLogger(__name__)

BRAIN = "brain"


def read_headct(root: Path, spec: DatasetSpec) -> Meta:
    """``labels.csv`` (``id, hemorrhage``) beside ``head_ct/head_ct/000.png ... 199.png``."""
    labels_csv = root / "labels.csv"
    image_dir = next(
        (folder for folder in (root / "head_ct" / "head_ct", root / "head_ct", root) if list_images(folder)),
        None,
    )
    if not labels_csv.is_file() or image_dir is None:
        converted = read_converted_single(root, spec, BRAIN)
        if converted is not None:
            return converted
        absent = labels_csv if not labels_csv.is_file() else root / "head_ct" / "head_ct"
        raise spec.layout_error(root, f"{absent} does not exist")

    with open(labels_csv, newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if header[:2] != ["id", "hemorrhage"]:
            raise spec.layout_error(root, f"{labels_csv} has columns {header}, expected ['id', 'hemorrhage']")
        labels = {int(row[0]): int(row[1]) for row in reader if row and row[0].strip()}

    images = {_numeric_stem(path): path for path in list_images(image_dir)}
    missing = [image_dir / f"{index:03d}.png" for index in labels if index not in images]
    if missing:
        raise InvalidSampleError(
            f"{spec.name}: {len(missing)} image(s) listed in {labels_csv} do not exist:\n{format_paths(missing)}\n"
            "Fix: re-extract the Kaggle archive so that head_ct/head_ct/ holds 000.png ... 199.png."
        )
    unlabeled = [path for index, path in images.items() if index not in labels]
    if unlabeled:
        log.warning(
            "%s: %d image(s) have no row in %s and are ignored", spec.name, len(unlabeled), labels_csv
        )
    builder = MetaBuilder(root)
    for index, label in sorted(labels.items()):
        builder.add("test", BRAIN, images[index], None, int(label != 0), "hemorrhage" if label else "good")
    return builder.result(spec)


def _numeric_stem(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _read_yes_no(root: Path, spec: DatasetSpec, folders: tuple[Path, ...]) -> Meta | None:
    for base in folders:
        yes, no = find_dir(base, "yes"), find_dir(base, "no")
        if yes is None or no is None:
            continue
        builder = MetaBuilder(root)
        # Normal first, as a per-category table reads more naturally that way; order is otherwise free.
        for folder, anomaly in ((no, 0), (yes, 1)):
            for image in list_images(folder):
                builder.add("test", BRAIN, image, None, anomaly, folder.name)
        return builder.result(spec)
    return None


def read_brainmri(root: Path, spec: DatasetSpec) -> Meta:
    """``brain_tumor_dataset/{yes,no}/`` (the Kaggle archive also has a duplicate ``yes/``, ``no/``
    at the top; ``brain_tumor_dataset/`` is preferred so no image is counted twice)."""
    meta = _read_yes_no(root, spec, (root / "brain_tumor_dataset", root))
    if meta is None:
        meta = read_converted_single(root, spec, BRAIN)
    if meta is None:
        raise spec.layout_error(root, "no yes/ and no/ folders (in brain_tumor_dataset/ or ROOT)")
    return meta


def read_br35h(root: Path, spec: DatasetSpec) -> Meta:
    """``yes/`` and ``no/``; the unlabelled ``pred/`` folder is ignored."""
    meta = _read_yes_no(root, spec, (root,))
    if meta is None:
        meta = read_converted_single(root, spec, BRAIN)
    if meta is None:
        raise spec.layout_error(root, "no yes/ and no/ folders")
    if find_dir(root, "pred") is not None:
        log.info("%s: pred/ holds unlabelled images and is not indexed", spec.name)
    return meta


_CONVERTED = "or the MVTec-style tree of the AnomalyCLIP/AdaCLIP preprocessing: ROOT/<one folder>/test/{good,<abnormal>}\n"

SPECS = (
    DatasetSpec(
        name="headct",
        title="Head CT (hemorrhage)",
        description=(
            "HeadCT: 200 head CT slices, 100 with hemorrhage (labels.csv). Image labels only (no masks); "
            "test split only; category 'brain'."
        ),
        layout=(
            "ROOT/\n"
            "  labels.csv                   (id, hemorrhage)\n"
            "  head_ct/head_ct/000.png ... 199.png\n" + _CONVERTED
        ),
        download="https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage (ROOT holds labels.csv)",
        reader=read_headct,
        categories=(BRAIN,),
        has_masks=False,
        has_train_split=False,
        aliases=("head_ct", "head-ct"),
    ),
    DatasetSpec(
        name="brainmri",
        title="Brain MRI (brain tumor detection)",
        description=(
            "BrainMRI: 253 brain MRI images, 155 with tumours (yes/) and 98 without (no/). Image labels only; "
            "test split only; category 'brain'."
        ),
        layout=("ROOT/\n  brain_tumor_dataset/yes/Y1.jpg\n  brain_tumor_dataset/no/1 no.jpeg\n" + _CONVERTED),
        download=(
            "https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection "
            "(ROOT holds brain_tumor_dataset/)"
        ),
        reader=read_brainmri,
        categories=(BRAIN,),
        has_masks=False,
        has_train_split=False,
        aliases=("brain_mri", "brain-mri"),
    ),
    DatasetSpec(
        name="br35h",
        title="Br35H (brain tumor detection 2020)",
        description=(
            "Br35H: 3000 brain MRI images, 1500 with tumours (yes/) and 1500 without (no/); pred/ is "
            "unlabelled and ignored. Image labels only; test split only; category 'brain'."
        ),
        layout=("ROOT/\n  yes/y0.jpg\n  no/no0.jpg\n  pred/            (ignored)\n" + _CONVERTED),
        download="https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection (ROOT holds yes/ and no/)",
        reader=read_br35h,
        categories=(BRAIN,),
        has_masks=False,
        has_train_split=False,
        aliases=("br35",),
    ),
)
