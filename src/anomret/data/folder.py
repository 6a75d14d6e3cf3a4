"""Unlabelled images for prediction: a file, or every image below a folder."""

from __future__ import annotations

from pathlib import Path

from anomret.data.datasets.layout import IMAGE_EXTENSIONS, natural_key
from anomret.data.errors import DatasetNotFoundError, EmptyCategoryError
from anomret.data.samples import NORMAL, Sample, SampleTable


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
