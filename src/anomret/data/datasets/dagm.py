"""DAGM 2007 (Kaggle release, as linked by AnomalyCLIP): 10 synthetic texture classes.

Published as ``ClassN/{Train,Test}/NNNN.PNG`` with defect masks ``ClassN/{Train,Test}/Label/
NNNN_label.PNG`` for the defective images only. An image is anomalous when its label image has any
set pixel. Both published splits are kept and both hold defective images.
"""

from __future__ import annotations

import re
from pathlib import Path

from anomret.data.datasets.layout import (
    DatasetSpec,
    MetaBuilder,
    find_dir,
    list_images,
    pair_by_stem,
    read_mvtec_category,
    subdirs,
)
from anomret.data.io import read_mask
from anomret.data.meta import Meta

DAGM_CATEGORIES = tuple(f"Class{index}" for index in range(1, 11))

_CLASS = re.compile(r"^class(\d+)$", re.IGNORECASE)


def read_dagm(root: Path, spec: DatasetSpec) -> Meta:
    classes = [folder for folder in subdirs(root) if _CLASS.match(folder.name)]
    if not classes:
        raise spec.layout_error(root, "no Class1 ... Class10 folders")
    builder = MetaBuilder(root)
    for folder in classes:
        match = _CLASS.match(folder.name)
        assert match is not None  # classes holds only the folders it matches
        category = f"Class{int(match.group(1))}"
        published = [find_dir(folder, split) for split in ("Train", "Test")]
        if not any(split is not None and find_dir(split, "Label") is not None for split in published):
            # The MVTec-style copy written by AdaCLIP's dagm-pre.py: {train,test}/{good,defect}.
            read_mvtec_category(builder, folder, category, dataset=spec.name, normal_dirs=("good",))
            continue
        for split_dir in published:
            if split_dir is None:
                continue
            label_dir = find_dir(split_dir, "Label")
            images = list_images(split_dir)
            masks = list_images(label_dir) if label_dir is not None else []
            pairs = pair_by_stem(
                images, masks, dataset=spec.name, mask_dir=label_dir or split_dir, require_all=False
            )
            for image in images:
                mask = pairs.get(image)
                defect = mask is not None and bool(read_mask(mask).any())
                builder.add(
                    split_dir.name.lower(),
                    category,
                    image,
                    mask if defect else None,
                    int(defect),
                    "defect" if defect else "good",
                )
    return builder.result(spec)


SPECS = (
    DatasetSpec(
        name="dagm",
        title="DAGM 2007",
        description=(
            "DAGM 2007: 10 synthetic texture classes (Class1..Class10) with defect masks. Both published "
            "splits are indexed (Train -> train, Test -> test) and both contain defective images: filter "
            "label==0 before using train as normal data."
        ),
        layout=(
            "ROOT/\n"
            "  Class1/\n"
            "    Train/0001.PNG\n"
            "    Train/Label/0002_label.PNG     (defective images only; Labels.txt is ignored)\n"
            "    Test/0001.PNG\n"
            "    Test/Label/0005_label.PNG\n"
            "  Class2/ ... Class10/\n"
            "or the MVTec-style copy of AdaCLIP's dagm-pre.py: ROOT/ClassN/{train,test}/{good,defect}, "
            "ground_truth/defect\n"
        ),
        download=(
            "https://www.kaggle.com/datasets/mhskjelvareid/dagm-2007-competition-dataset-optical-inspection "
            "(ROOT holds Class1/ ... Class10/)"
        ),
        reader=read_dagm,
        categories=DAGM_CATEGORIES,
        has_masks=True,
        has_train_split=True,
        aliases=("dagm2007",),
    ),
)
