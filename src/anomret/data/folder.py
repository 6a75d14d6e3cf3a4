"""Unlabelled images for prediction: a file, or every image below a folder."""

from __future__ import annotations

import logging
from pathlib import Path

from anomret.data.datasets.layout import IMAGE_EXTENSIONS, natural_key
from anomret.data.errors import DatasetNotFoundError, EmptyCategoryError, InvalidSampleError, format_paths
from anomret.data.io import check_image
from anomret.data.samples import NORMAL, Sample, SampleTable

log = logging.getLogger(__name__)


def input_base(path: str | Path) -> Path:
    """The folder that prediction outputs mirror: ``path`` itself, or a single file's folder."""
    path = Path(path).expanduser().resolve()
    return path.parent if path.is_file() else path


def image_folder_samples(path: str | Path, source: str = "input") -> SampleTable:
    """Every image at ``path`` (one file, or a folder searched recursively), in natural order.

    The category of an image is its folder relative to ``path`` (``path``'s own name for images directly
    inside it), so per-category outputs mirror the input tree. Labels are unknown and set to normal.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise DatasetNotFoundError(
            f"prediction input {path} does not exist. Fix: pass input=/path/to/images."
        )
    if path.is_file():
        files, base = [path], path.parent
    else:
        files = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        files.sort(key=lambda p: [natural_key(part) for part in p.relative_to(path).parts])
        base = path
    if not files:
        raise EmptyCategoryError(
            f"no images under {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}). "
            "Fix: point input= at a folder of images."
        )
    return SampleTable(
        Sample(
            image_path=file,
            mask_path=None,
            category=file.parent.relative_to(base).as_posix() if file.parent != base else base.name,
            label=NORMAL,
            split="predict",
            source=source,
        )
        for file in files
    )


def readable_samples(samples: SampleTable, where: str | Path) -> SampleTable:
    """The samples whose files can be read whole; every other one is named in a warning and skipped.

    One bad file in a folder of images to score must not cost the scores of the others. Only when no
    file at all can be read is it an error.
    """
    kept, skipped = [], []
    for sample in samples:
        try:
            check_image(sample.image_path)
        except InvalidSampleError as error:
            log.warning("skipping an unreadable file: %s", str(error).replace("\n", " "))
            skipped.append(sample.image_path)
            continue
        kept.append(sample)
    if not kept:
        raise EmptyCategoryError(
            f"none of the {len(samples)} image file(s) under {where} can be read:\n{format_paths(skipped)}\n"
            "Fix: point input= at a folder of readable images (PNG, JPEG, BMP, TIFF)."
        )
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d under %s", len(skipped), len(samples), where)
    return SampleTable(kept)
