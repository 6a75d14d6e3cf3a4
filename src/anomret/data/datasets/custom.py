"""Your own images in MVTec layout, with any category names: ``python -m anomret.prepare folder ROOT``.

Every sub-folder of ROOT holding ``test/`` (or ``train/``) is a category, named after the folder. Images
go in one folder per type (``good`` is normal, any other name is a defect type); masks, when there are
any, in ``ground_truth/<defect>/<stem>[_mask].<ext>``. A category without a ``ground_truth`` folder is
indexed with image labels only (its runs then need ``dataset.require_masks=false``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from anomret.data.datasets.layout import DatasetSpec, MetaBuilder, find_dir, read_mvtec_category, subdirs
from anomret.data.meta import Meta

log = logging.getLogger(__name__)


def read_folder(root: Path, spec: DatasetSpec) -> Meta:
    """Index every MVTec-style category folder of ``root``, whatever its name; warn about the others."""
    builder = MetaBuilder(root)
    for folder in subdirs(root):
        if find_dir(folder, "test") is None and find_dir(folder, "train") is None:
            log.warning(
                "%s: %s/ has no test/ or train/ folder and is not a category; it is left out",
                spec.name,
                folder,
            )
            continue
        read_mvtec_category(
            builder,
            folder,
            folder.name,
            dataset=spec.name,
            has_masks=find_dir(folder, "ground_truth") is not None,
        )
    return builder.result(spec)


FOLDER = DatasetSpec(
    name="folder",
    title="a folder in MVTec layout",
    description=(
        "Any folder in MVTec layout, with categories of any name: your own images. Masks are optional "
        "(a category without ground_truth/ gets image labels only)."
    ),
    layout=(
        "ROOT/\n"
        "  <category>/        (one folder per category, any name)\n"
        "    train/good/*.png          (optional: normal images)\n"
        "    test/good/*.png\n"
        "    test/<defect>/*.png\n"
        "    ground_truth/<defect>/<stem>_mask.png   (optional: pixel masks)\n"
    ),
    download="your own images",
    reader=read_folder,
    categories=None,
    has_masks=True,
    has_train_split=True,
    aliases=("mvtec_layout", "custom"),
)
