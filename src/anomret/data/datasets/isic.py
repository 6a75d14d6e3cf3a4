"""ISIC 2016 lesion segmentation, test part 1, as used by AnomalyCLIP (category ``skin``).

Every image shows a lesion and has a segmentation mask (``ISIC_0000003.jpg`` <->
``ISIC_0000003_Segmentation.png``), so all records are anomalous: the set measures localisation.
"""

from __future__ import annotations

from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    find_dir,
    list_images,
    pair_by_stem,
    read_converted_single,
    subdirs,
)
from anomret.data.meta import Meta

SKIN = "skin"
IMAGES = "ISBI2016_ISIC_Part1_Test_Data"
MASKS = "ISBI2016_ISIC_Part1_Test_GroundTruth"


def read_isic(root: Path, spec: DatasetSpec) -> Meta:
    image_dirs: list[Path] = []
    mask_dir = find_dir(root, MASKS)
    published = find_dir(root, IMAGES)
    if published is not None:
        image_dirs = [published]
    else:
        # AnomalyCLIP's arrangement: skin/test/<any>/ beside skin/ISBI2016_ISIC_Part1_Test_GroundTruth/.
        skin = find_dir(root, SKIN)
        test = find_dir(skin, "test") if skin is not None else None
        if skin is not None and test is not None and find_dir(skin, MASKS) is not None:
            image_dirs = subdirs(test)
            mask_dir = find_dir(skin, MASKS)
    if not image_dirs or mask_dir is None:
        converted = read_converted_single(root, spec, SKIN)
        if converted is not None:
            return converted
        missing = MASKS if published is not None else IMAGES
        raise spec.layout_error(root, f"no {missing}/ folder")

    builder = MetaBuilder(root)
    images = [image for folder in image_dirs for image in list_images(folder)]
    pairs = pair_by_stem(images, list_images(mask_dir), dataset=spec.name, mask_dir=mask_dir)
    for image in images:
        builder.add("test", SKIN, image, pairs[image], 1, "lesion")
    return builder.result(spec)


SPECS = (
    DatasetSpec(
        name="isic",
        title="ISIC 2016 (ISBI 2016 lesion segmentation, test part 1)",
        description=(
            "ISIC: 379 dermoscopic test images of ISBI 2016 part 1, each with a lesion mask; all anomalous "
            "(pixel metrics only); test split only; category 'skin'."
        ),
        layout=(
            "ROOT/\n"
            f"  {IMAGES}/ISIC_0000003.jpg\n"
            f"  {MASKS}/ISIC_0000003_Segmentation.png\n"
            f"or AnomalyCLIP's: ROOT/skin/test/<any>/ISIC_*.jpg + ROOT/skin/{MASKS}/\n"
            "or the MVTec-style tree of AdaCLIP's preprocessing: ROOT/<one folder>/{test/<type>,ground_truth/<type>}\n"
        ),
        download=(
            "https://isic-challenge-data.s3.amazonaws.com/2016/ISBI2016_ISIC_Part1_Test_Data.zip and "
            "https://isic-challenge-data.s3.amazonaws.com/2016/ISBI2016_ISIC_Part1_Test_GroundTruth.zip "
            "(extract both into ROOT); the MRAD README also links a copy: "
            "https://drive.google.com/file/d/1UeuKgF1QYfT1jTlYHjxKB3tRjrFHfFDR/view"
        ),
        reader=read_isic,
        categories=(SKIN,),
        has_masks=True,
        has_train_split=False,
        aliases=("isbi", "isic2016"),
    ),
)
