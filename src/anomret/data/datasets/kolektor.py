"""KolektorSDD and KolektorSDD2 (surface defects on electrical commutators).

Both publish one label image per image, blank for defect-free ones, so the image label is read from
the mask (anomalous when any pixel is set). Normal images get ``mask_path=""`` as everywhere else.
The category name is the one of the MRAD/AnomalyCLIP class list: ``electrical commutators``.
"""

from __future__ import annotations

import re
from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    find_dir,
    list_images,
    mask_key,
    pair_by_stem,
    read_converted_single,
    subdirs,
)
from anomret.data.io import read_mask
from anomret.data.meta import Meta

COMMUTATORS = "electrical commutators"

_KOS = re.compile(r"^kos\d+$", re.IGNORECASE)


def _has_defect(mask: Path) -> bool:
    return bool(read_mask(mask).any())


def _add_labelled_folder(
    builder: MetaBuilder, spec: DatasetSpec, split: str, folder: Path, mask_suffix: str
) -> None:
    """Add a folder of images each paired with a ``<stem><mask_suffix>`` label image; the label image
    decides whether the image is anomalous (a blank label means a defect-free image)."""
    files = list_images(folder)
    masks = [path for path in files if path.stem.lower().endswith(mask_suffix)]
    images = [path for path in files if not path.stem.lower().endswith(mask_suffix)]
    pairs = pair_by_stem(images, masks, dataset=spec.name, mask_dir=folder)
    for image in images:
        mask = pairs[image]
        defect = _has_defect(mask)
        builder.add(
            split, COMMUTATORS, image, mask if defect else None, int(defect), "defect" if defect else "good"
        )


def read_ksdd(root: Path, spec: DatasetSpec) -> Meta:
    """``ROOT/kosNN/PartK.jpg`` with ``PartK_label.bmp``; all images go to the test split."""
    parts = [folder for folder in subdirs(root) if _KOS.match(folder.name)]
    if not parts:
        converted = read_converted_single(root, spec, COMMUTATORS)
        if converted is not None:
            return converted
        raise spec.layout_error(root, "no kosNN/ folders")
    builder = MetaBuilder(root)
    for folder in parts:
        _add_labelled_folder(builder, spec, "test", folder, mask_suffix="_label")
    return builder.result(spec)


def read_ksdd2(root: Path, spec: DatasetSpec) -> Meta:
    """``ROOT/{train,test}/NNNNN.png`` with ``NNNNN_GT.png``; both published splits are kept."""
    split_dirs = {split: find_dir(root, split) for split in ("train", "test")}
    if split_dirs["test"] is None or not any(
        mask_key(path) != path.stem.lower() for path in list_images(split_dirs["test"])
    ):
        converted = read_converted_single(root, spec, COMMUTATORS)
        if converted is not None:
            return converted
        raise spec.layout_error(root, "no test/ folder holding NNNNN.png + NNNNN_GT.png pairs")
    builder = MetaBuilder(root)
    for split, folder in split_dirs.items():
        if folder is not None:
            _add_labelled_folder(builder, spec, split, folder, mask_suffix="_gt")
    return builder.result(spec)


_CONVERTED = (
    "or the MVTec-style tree of the AnomalyCLIP/AdaCLIP preprocessing: ROOT/<one folder>/"
    "{test/good,test/<defect>,ground_truth/<defect>}\n"
)

SPECS = (
    DatasetSpec(
        name="sdd",
        title="KolektorSDD",
        description=(
            "KolektorSDD: 399 images of 50 electrical commutators (kos01..kos50, 8 parts each), 52 with "
            "defects and pixel masks. Labels come from the masks; everything is test data (zero-shot "
            "protocol of AnomalyCLIP/MRAD), category 'electrical commutators'."
        ),
        layout=(
            "ROOT/\n"
            "  kos01/Part0.jpg\n"
            "  kos01/Part0_label.bmp        (blank for defect-free parts)\n"
            "  ...\n"
            "  kos50/Part7.jpg\n" + _CONVERTED
        ),
        download="https://www.vicos.si/resources/kolektorsdd/ (KolektorSDD.zip; ROOT holds kos01/ ... kos50/)",
        reader=read_ksdd,
        categories=(COMMUTATORS,),
        has_masks=True,
        has_train_split=False,
        aliases=("ksdd", "kolektorsdd", "kolektor"),
    ),
    DatasetSpec(
        name="ksdd2",
        title="KolektorSDD2",
        description=(
            "KolektorSDD2: 3335 images of commutator surfaces with pixel masks, published as train "
            "(2331, 246 defective) and test (1004, 110 defective). Labels come from the masks. The train "
            "split is kept as published and holds defective images: filter label==0 before using it as "
            "normal data. Category 'electrical commutators' (MRAD class list)."
        ),
        layout=(
            "ROOT/\n"
            "  train/10000.png\n"
            "  train/10000_GT.png           (blank for defect-free images)\n"
            "  test/20000.png\n"
            "  test/20000_GT.png\n" + _CONVERTED
        ),
        download="https://www.vicos.si/resources/kolektorsdd2/ (KolektorSDD2.zip; ROOT holds train/ and test/)",
        reader=read_ksdd2,
        categories=(COMMUTATORS,),
        has_masks=True,
        has_train_split=True,
        aliases=("kolektorsdd2",),
    ),
)
