"""The MVTec-style industrial benchmarks: MVTec AD, MPDD, BTAD and DTD-Synthetic.

All four are published as ``ROOT/<category>/{train/<normal>, test/<type>, ground_truth/<type>}``;
they differ in category names, the name of the normal folder (``good``, BTAD ``ok``) and the mask
naming (``000_mask.png`` or the image's own stem). Masks are paired by stem either way.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    find_dir,
    mvtec_style_dirs,
    read_mvtec_category,
)
from anomret.data.meta import Meta

log = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
BTAD_CATEGORIES = ("01", "02", "03")
# The order of the AnomalyCLIP/MRAD class list.
DTD_CATEGORIES = (
    "Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
    "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069",
)  # fmt: skip


def read_mvtec_family(root: Path, spec: DatasetSpec, *, normal_dirs: tuple[str, ...] = ("good",)) -> Meta:
    """Index every known category folder of ``root``; a subset of the categories is fine."""
    categories = spec.categories or ()
    found: list[tuple[str, Path]] = []
    for category in categories:
        folder = find_dir(root, category)
        if folder is not None and find_dir(folder, "test") is not None:
            found.append((category, folder))
    known = {folder for _, folder in found}
    strangers = [child.name for child in mvtec_style_dirs(root) if child not in known]
    if not found:
        extra = f" (found {', '.join(strangers)} instead)" if strangers else ""
        raise spec.layout_error(root, f"no category folder with a test/ sub-folder{extra}")
    if strangers:
        log.warning("%s: ignoring folders that are not %s categories: %s", spec.name, spec.title, strangers)
    missing = [category for category in categories if category not in {name for name, _ in found}]
    if missing:
        log.warning(
            "%s: %d of %d categories are absent: %s", spec.name, len(missing), len(categories), missing
        )
    builder = MetaBuilder(root)
    for category, folder in found:
        read_mvtec_category(
            builder, folder, category, dataset=spec.name, normal_dirs=normal_dirs, has_masks=spec.has_masks
        )
    return builder.result(spec)


def _tree(first: str, categories: str, normal: str, defect: str, image: str, mask: str) -> str:
    return (
        "ROOT/\n"
        f"  {first}/{' ' * max(1, 16 - len(first))}(one folder per category: {categories})\n"
        f"    train/{normal}/{image}\n"
        f"    test/{normal}/{image}\n"
        f"    test/{defect}/{image}\n"
        f"    ground_truth/{defect}/{mask}\n"
    )


SPECS = (
    DatasetSpec(
        name="mvtec",
        title="MVTec AD",
        description=(
            "MVTec Anomaly Detection: 15 object and texture categories of industrial images with "
            "pixel masks. train/good holds the normal training images (unsupervised use, RAD); test holds "
            "normal and defective images."
        ),
        layout=_tree(
            "bottle", "bottle, cable, ..., 15 in all", "good", "<defect type>", "000.png", "000_mask.png"
        ),
        download=(
            "https://www.mvtec.com/company/research/datasets/mvtec-ad (mvtec_anomaly_detection.tar.xz; "
            "ROOT is the folder holding bottle/, cable/, ...)"
        ),
        reader=read_mvtec_family,
        categories=MVTEC_CATEGORIES,
        has_masks=True,
        has_train_split=True,
        aliases=("mvtec_ad", "mvtecad", "mvtec-ad"),
    ),
    DatasetSpec(
        name="btad",
        title="BTAD (beanTech Anomaly Detection)",
        description=(
            "BTAD: 3 industrial products (01, 02, 03) with pixel masks; normal images are in 'ok' folders, "
            "defective ones in 'ko'. Masks share the image stem (category 03 stores them as .bmp)."
        ),
        layout=_tree("01", "01, 02, 03", "ok", "ko", "0000.bmp", "0000.png   (same stem as the image)"),
        download=(
            "http://avires.dimi.uniud.it/papers/btad/btad.zip (ROOT is the extracted BTech_Dataset_transformed/)"
        ),
        reader=functools.partial(read_mvtec_family, normal_dirs=("ok", "good")),
        categories=BTAD_CATEGORIES,
        has_masks=True,
        has_train_split=True,
        aliases=("btech",),
    ),
    DatasetSpec(
        name="mpdd",
        title="MPDD (Metal Parts Defect Detection)",
        description="MPDD: 6 categories of painted metal parts, MVTec-style layout with pixel masks.",
        layout=_tree(
            "bracket_black",
            "bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes",
            "good",
            "<defect type>",
            "000.png",
            "000_mask.png",
        ),
        download="https://github.com/stepanje/MPDD (download link in its README)",
        reader=read_mvtec_family,
        categories=MPDD_CATEGORIES,
        has_masks=True,
        has_train_split=True,
    ),
    DatasetSpec(
        name="dtd",
        title="DTD-Synthetic",
        description=(
            "DTD-Synthetic: 12 texture categories from the Describable Textures Dataset with synthetic "
            "defects and pixel masks, MVTec-style layout (Woven_001, Blotchy_099, ...)."
        ),
        layout=_tree(
            "Woven_001", "Woven_001, Blotchy_099, ..., 12 in all", "good", "bad", "000.png", "000_mask.png"
        ),
        download="https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1 (DTD-Synthetic)",
        reader=read_mvtec_family,
        categories=DTD_CATEGORIES,
        has_masks=True,
        has_train_split=True,
        aliases=("dtd-synthetic", "dtd_synthetic"),
    ),
)
