"""Endoscopy segmentation sets: CVC-ColonDB, CVC-ClinicDB, Kvasir-SEG and EndoTect (category ``colon``).

Each is an ``images/`` folder beside a ``masks/`` folder with the same file stems, every image
showing a polyp (or lesion), so all records are anomalous and the sets measure localisation only.
The ColonDB/ClinicDB/Kvasir copies MRAD links are the ``TestDataset/<name>/`` folders of the PraNet
polyp archive; ROOT may be that folder, or a folder above it.
"""

from __future__ import annotations

import functools
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

COLON = "colon"
_IMAGE_DIRS = ("images", "image", "Original")
_MASK_DIRS = ("masks", "mask", "Ground Truth", "GroundTruth")


def _locate(root: Path, names: tuple[str, ...]) -> Path | None:
    """The folder holding images/ + masks/: ROOT itself, or ROOT/[TestDataset/]<published name>."""
    candidates = [root]
    for name in names:
        candidates += [root / "TestDataset" / name, root / name]
    for base in candidates:
        if find_dir(base, *_IMAGE_DIRS) is not None and find_dir(base, *_MASK_DIRS) is not None:
            return base
    return None


def read_polyp(root: Path, spec: DatasetSpec, *, folder_names: tuple[str, ...] = ()) -> Meta:
    base = _locate(root, folder_names)
    if base is None:
        converted = read_converted_single(root, spec, COLON)
        if converted is not None:
            return converted
        raise spec.layout_error(root, "no images/ and masks/ folders")
    image_dir, mask_dir = find_dir(base, *_IMAGE_DIRS), find_dir(base, *_MASK_DIRS)
    assert image_dir is not None and mask_dir is not None
    images = list_images(image_dir)
    pairs = pair_by_stem(images, list_images(mask_dir), dataset=spec.name, mask_dir=mask_dir)
    builder = MetaBuilder(root)
    for image in images:
        builder.add("test", COLON, image, pairs[image], 1, "polyp")
    return builder.result(spec)


def read_endo(root: Path, spec: DatasetSpec) -> Meta:
    """``masks/`` beside one or more image folders (AnomalyCLIP's reading: every folder but masks/
    holds images, anomalous unless it is named ``good``)."""
    mask_dir = find_dir(root, *_MASK_DIRS)
    image_dirs = [folder for folder in subdirs(root) if folder != mask_dir and list_images(folder)]
    if mask_dir is None or not image_dirs:
        converted = read_converted_single(root, spec, COLON)
        if converted is not None:
            return converted
        raise spec.layout_error(root, "no masks/ folder beside an images/ folder")
    builder = MetaBuilder(root)
    anomalous = [folder for folder in image_dirs if folder.name.lower() != "good"]
    images = [image for folder in anomalous for image in list_images(folder)]
    pairs = pair_by_stem(images, list_images(mask_dir), dataset=spec.name, mask_dir=mask_dir)
    for folder in image_dirs:
        normal = folder.name.lower() == "good"
        for image in list_images(folder):
            builder.add("test", COLON, image, None if normal else pairs[image], int(not normal), folder.name)
    return builder.result(spec)


def _layout(published: str) -> str:
    return (
        f"ROOT/                     (the archive's TestDataset/{published}/; or a folder above it)\n"
        "  images/1.png\n"
        "  masks/1.png              (same stem as the image)\n"
        "or the MVTec-style tree of AdaCLIP's preprocessing: ROOT/<one folder>/{test/<type>,ground_truth/<type>}\n"
    )


_POLYP_ARCHIVE = (
    "https://figshare.com/articles/figure/Polyp_DataSet_zip/21221579 (PraNet polyp archive; use "
    "TestDataset/{name}/)"
)

SPECS = (
    DatasetSpec(
        name="colondb",
        title="CVC-ColonDB",
        description="CVC-ColonDB: 380 colonoscopy frames with polyp masks; all anomalous; test only; category 'colon'.",
        layout=_layout("CVC-ColonDB"),
        download=_POLYP_ARCHIVE.format(name="CVC-ColonDB"),
        reader=functools.partial(read_polyp, folder_names=("CVC-ColonDB", "ColonDB")),
        categories=(COLON,),
        has_masks=True,
        has_train_split=False,
        aliases=("cvc-colondb", "cvc_colondb"),
    ),
    DatasetSpec(
        name="clinicdb",
        title="CVC-ClinicDB",
        description=(
            "CVC-ClinicDB: colonoscopy frames with polyp masks (62 in the PraNet test split, 612 in the "
            "original release, whose Original/ + 'Ground Truth'/ folders are accepted too); all anomalous; "
            "test only; category 'colon'."
        ),
        layout=_layout("CVC-ClinicDB"),
        download=_POLYP_ARCHIVE.format(name="CVC-ClinicDB"),
        reader=functools.partial(read_polyp, folder_names=("CVC-ClinicDB", "ClinicDB")),
        categories=(COLON,),
        has_masks=True,
        has_train_split=False,
        aliases=("cvc-clinicdb", "cvc_clinicdb"),
    ),
    DatasetSpec(
        name="kvasir",
        title="Kvasir-SEG",
        description=(
            "Kvasir-SEG: colonoscopy images with polyp masks (100 in the PraNet test split, 1000 in the "
            "original release, same images/ + masks/ layout); all anomalous; test only; category 'colon'."
        ),
        layout=_layout("Kvasir"),
        download=_POLYP_ARCHIVE.format(name="Kvasir") + "; or https://datasets.simula.no/kvasir-seg/",
        reader=functools.partial(read_polyp, folder_names=("Kvasir", "Kvasir-SEG")),
        categories=(COLON,),
        has_masks=True,
        has_train_split=False,
        aliases=("kvasir-seg", "kvasir_seg"),
    ),
    DatasetSpec(
        name="endo",
        title="EndoTect 2020 segmentation test set",
        description=(
            "Endo (EndoTect 2020 segmentation test set, from HyperKvasir): endoscopy images with lesion "
            "masks; all anomalous (unless in a good/ folder); test only; category 'colon'."
        ),
        layout=(
            "ROOT/                     (EndoTect_2020_Segmentation_Test_Dataset/)\n"
            "  images/<name>.jpg\n"
            "  masks/<name>.<ext>       (same stem as the image)\n"
            "or the MVTec-style tree of AdaCLIP's preprocessing: ROOT/<one folder>/{test/<type>,ground_truth/<type>}\n"
        ),
        download=(
            "https://drive.google.com/file/d/1LNpLkv5ZlEUzr_RPN5rdOHaqk0SkZa3m/view (as linked by "
            "AnomalyCLIP and MRAD)"
        ),
        reader=read_endo,
        categories=(COLON,),
        has_masks=True,
        has_train_split=False,
        aliases=("endotect", "hyperkvasir"),
    ),
)
