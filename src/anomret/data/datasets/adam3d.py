"""3D-ADAM, RGB only, from its anomalib layout on the Hugging Face hub (``pmchard/3D-ADAM_anomalib``).

The published tree is ``ROOT/<category>/{train,validation,test}/<type>/{rgb,xyz[,ground_truth]}/``:
``train/good`` holds the normal training images, ``validation/good`` normal images and
``test/<defect>`` the defective ones, each with its masks in ``ground_truth/`` under the image's
file name. RAD (``prepare_data/prepare_3dadam.py``) evaluates on ``validation/good`` as the normal
test images plus ``test/<defect>``; this reader indexes the same split without copying anything
(a ``test/good`` folder, if present, is read as normal test images too). The ``xyz`` point clouds are
not used.

The MVTec-style copy that RAD's script writes (``<category>/{train/good,test/good,test/<defect>,
ground_truth/<defect>}``) is accepted too, category by category.
"""

from __future__ import annotations

import logging
from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    find_dir,
    list_images,
    mvtec_style_dirs,
    pair_by_stem,
    read_mvtec_category,
    subdirs,
)
from anomret.data.meta import Meta

log = logging.getLogger(__name__)

ADAM3D_CATEGORIES = (
    "1m1", "1m2", "1m3", "2m1", "2m2h", "2m2m", "3m1", "3m2", "3m2c", "4m1", "4m2", "4m2c",
    "gripper_closed", "gripper_open", "helicalgear1", "helicalgear2", "rackgear", "spiralgear",
    "spurgear", "tapa2m1", "tapa3m1", "tapa4m1", "tapatbb",
)  # fmt: skip

NORMAL = "good"
RGB = "rgb"
MASKS = "ground_truth"


def is_anomalib_layout(category_dir: Path) -> bool:
    """Whether a category folder has the hub's ``<split>/<type>/rgb`` folders (not an MVTec-style copy)."""
    return any(
        find_dir(type_dir, RGB) is not None
        for split in ("train", "validation", "test")
        if (split_dir := find_dir(category_dir, split)) is not None
        for type_dir in subdirs(split_dir)
    )


def read_adam3d(root: Path, spec: DatasetSpec) -> Meta:
    found: list[tuple[str, Path]] = []
    for category in ADAM3D_CATEGORIES:
        folder = find_dir(root, category)
        if folder is not None and (is_anomalib_layout(folder) or find_dir(folder, "test") is not None):
            found.append((category, folder))
    known = {folder for _, folder in found}
    strangers = [child.name for child in mvtec_style_dirs(root) if child not in known]
    if not found:
        extra = f" (found {', '.join(strangers)} instead)" if strangers else ""
        raise spec.layout_error(
            root, f"no category folder with train/, validation/ or test/ sub-folders{extra}"
        )
    if strangers:
        log.warning("%s: ignoring folders that are not %s categories: %s", spec.name, spec.title, strangers)
    missing = [category for category in ADAM3D_CATEGORIES if category not in {name for name, _ in found}]
    if missing:
        log.warning(
            "%s: %d of %d categories are absent: %s", spec.name, len(missing), len(ADAM3D_CATEGORIES), missing
        )

    builder = MetaBuilder(root)
    for category, folder in found:
        if is_anomalib_layout(folder):
            _read_anomalib_category(builder, folder, category, spec)
        else:
            read_mvtec_category(builder, folder, category, dataset=spec.name, normal_dirs=(NORMAL,))
            log.info("%s: %s read as an MVTec-style copy", spec.name, folder)
    return builder.result(spec)


def _read_anomalib_category(builder: MetaBuilder, folder: Path, category: str, spec: DatasetSpec) -> None:
    for split, source in (("train", "train"), ("test", "validation"), ("test", "test")):
        split_dir = find_dir(folder, source)
        if split_dir is None:
            continue
        for type_dir in subdirs(split_dir):
            rgb_dir = find_dir(type_dir, RGB)
            images = list_images(rgb_dir) if rgb_dir is not None else []
            if type_dir.name.lower() == NORMAL:
                for image in images:
                    builder.add(split, category, image, None, 0, type_dir.name)
                continue
            if source != "test":
                # RAD takes only the normal images of train/ and validation/.
                log.warning(
                    "%s: %s is not used (defective images are read from test/ only)", spec.name, type_dir
                )
                continue
            mask_dir = find_dir(type_dir, MASKS)
            masks = list_images(mask_dir) if mask_dir is not None else []
            pairs = pair_by_stem(images, masks, dataset=spec.name, mask_dir=mask_dir or type_dir / MASKS)
            for image in images:
                builder.add(split, category, image, pairs[image], 1, type_dir.name)


SPECS = (
    DatasetSpec(
        name="3dadam",
        title="3D-ADAM",
        description=(
            "3D-ADAM: 23 categories of machined and additively manufactured parts, RGB images with pixel "
            "masks (the point clouds are not used). train = train/good; test = validation/good (normal) + "
            "test/<defect>, as RAD evaluates it."
        ),
        layout=(
            "ROOT/\n"
            "  1m1/                 (one folder per category: 1m1, 1m2, ..., tapatbb, 23 in all)\n"
            "    train/good/rgb/000.png\n"
            "    validation/good/rgb/000.png\n"
            "    test/<defect>/rgb/000.png\n"
            "    test/<defect>/ground_truth/000.png\n"
            "or the MVTec-style copy written by RAD's prepare_3dadam.py: ROOT/<category>/{train/good,test/good,"
            "test/<defect>,ground_truth/<defect>}\n"
        ),
        download=(
            "https://huggingface.co/datasets/pmchard/3D-ADAM_anomalib (adam3d_cropped.zip; ROOT is the folder "
            "holding 1m1/, 1m2/, ...)"
        ),
        reader=read_adam3d,
        categories=ADAM3D_CATEGORIES,
        has_masks=True,
        has_train_split=True,
        aliases=("3d-adam", "3d_adam", "adam3d"),
    ),
)
