"""Unlabelled images for prediction: a file, or every image below a folder.

Symbolic links are followed, to image files and to folders alike (a folder of links to images kept
elsewhere is a common way to pick images), with each real folder read once. Links that lead nowhere
(broken, looping, or to a folder already read, which would read its images twice) are skipped and named
in one warning; ``input=`` itself being such a link is an error that says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from anomret.data.datasets.layout import IMAGE_EXTENSIONS, natural_key
from anomret.data.errors import DatasetNotFoundError, EmptyCategoryError, InvalidSampleError, format_paths
from anomret.data.io import check_image
from anomret.data.samples import NORMAL, Sample, SampleTable

log = logging.getLogger(__name__)


def input_base(path: str | Path) -> Path:
    """The folder that prediction outputs mirror: ``path`` itself, or a single file's folder."""
    path = _resolved_input(path)
    return path.parent if path.is_file() else path


def _resolved_input(path: str | Path) -> Path:
    given = Path(path).expanduser()
    try:
        return given.resolve(strict=True)
    except FileNotFoundError:
        if given.is_symlink():
            raise DatasetNotFoundError(
                f"prediction input {given} is a symbolic link to {os.readlink(given)}, which does not exist. "
                "Fix: pass input= the folder or file itself, or repair the link."
            ) from None
        raise DatasetNotFoundError(
            f"prediction input {given.absolute()} does not exist. Fix: pass input=/path/to/images."
        ) from None
    except (RuntimeError, OSError) as error:  # a loop: RuntimeError before Python 3.13, ELOOP after
        raise DatasetNotFoundError(
            f"prediction input {given} is a symbolic link that loops ({error}). Fix: pass input= the folder "
            "or file itself, or repair the link."
        ) from None


def _images_below(base: Path) -> tuple[list[Path], list[Path]]:
    """Image files below ``base`` by their paths under it (links followed, each real folder once, hidden
    entries skipped), and the links skipped because they lead nowhere."""
    files: list[Path] = []
    skipped: list[Path] = []
    # A link to a folder of the tree itself would read its images twice (under two categories).
    tree = {Path(folder).resolve() for folder, _, _ in os.walk(base)}
    walked: set[Path] = set()

    def walk(folder: Path, linked: bool = False) -> bool:
        real = folder.resolve()
        if real in walked or (linked and real in tree):
            return False
        walked.add(real)
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        for entry in listed:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
                if entry.is_symlink():
                    path.resolve(strict=True)  # broken or looping: raises
            except (OSError, RuntimeError):
                skipped.append(path)
                continue
            if is_dir:
                if not walk(path, entry.is_symlink()):
                    skipped.append(path)
            elif is_file and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
        return True

    walk(base)
    return files, skipped


def image_folder_samples(path: str | Path, source: str = "input") -> SampleTable:
    """Every image at ``path`` (one file, or a folder searched recursively), in natural order.

    The category of an image is its folder relative to ``path`` (``path``'s own name for images directly
    inside it), so per-category outputs mirror the input tree. Labels are unknown and set to normal.
    Symbolic links are followed; those that lead nowhere are named in a warning (see the module docstring).
    """
    path = _resolved_input(path)
    if path.is_file():
        files, base = [path], path.parent
    else:
        files, skipped = _images_below(path)
        if skipped:
            shown = ", ".join(str(link) for link in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            log.warning(
                "skipped %d symbolic link(s) under %s that lead nowhere (broken, looping, or to a folder read "
                "already): %s%s",
                len(skipped),
                path,
                shown,
                more,
            )
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
