"""Loading one data source (a dataset root with a meta.json index) as a validated ``SampleTable``.

:func:`load_source` is what a run calls before any compute: it resolves the dataset, reads the
requested split and categories, and checks that every file it will read exists and that each mask
has its image's size (from file headers only), so that a broken dataset fails in seconds with a
message that says how to fix it, not an hour into a run.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from anomret.data.datasets import DATASETS, DatasetSpec, get_spec
from anomret.data.errors import (
    DatasetNotFoundError,
    EmptyCategoryError,
    InvalidSampleError,
    SplitNotFoundError,
    UnknownCategoryError,
    format_paths,
)
from anomret.data.io import check_image
from anomret.data.meta import META_FILENAME, load_meta, read_meta_json
from anomret.data.samples import SampleTable

log = logging.getLogger(__name__)

_GENERIC_LAYOUT = (
    "ROOT/\n"
    '  meta.json      {"train": {category: [record, ...]}, "test": {category: [record, ...]}}\n'
    '                 record = {"img_path": "cat/x.png", "mask_path": "cat/x_mask.png" or "",\n'
    '                           "cls_name": "cat", "specie_name": "", "anomaly": 0 or 1}\n'
    "  <the images and masks, at the paths the records give relative to ROOT>\n"
)


def load_source(
    name: str,
    root: str | Path,
    *,
    split: str = "test",
    categories: list[str] | None = None,
    require_masks: bool | None = None,
    source: str | None = None,
    validate: bool = True,
    evaluated: bool = False,
) -> SampleTable:
    """Read one split of a dataset into a ``SampleTable``, checked before any compute.

    Args:
        name: a known dataset (``mvtec``, ``visa``, ... see ``DATASETS``; case-insensitive) or any
            other name for a user dataset whose ROOT already holds a meta.json.
        root: the dataset folder (holding ``meta.json``).
        split: ``train`` or ``test``.
        categories: categories to keep (in this order); ``None`` keeps all of the split.
        require_masks: every anomalous sample must have a pixel mask. ``None``: the dataset's own
            ``has_masks`` (False for image-level sets such as headct), True for user datasets.
        source: the ``Sample.source`` tag; defaults to the dataset name (canonical for known ones).
        validate: check that files exist and that masks match their images' sizes (header reads).
        evaluated: the run scores these images; categories without both normal and anomalous images,
            whose detection metrics are undefined, are named in a warning (:func:`warn_if_unscorable`).

    Raises:
        DatasetNotFoundError: ROOT or its meta.json is missing (the message gives the command).
        SplitNotFoundError: the index has no such split.
        UnknownCategoryError: a requested category is not in the dataset.
        EmptyCategoryError: a selected category, or the whole split, has no samples.
        InvalidSampleError: an anomalous sample lacks a required mask, a file is missing or
            unreadable, or a mask's size differs from its image's.
    """
    spec = get_spec(name)
    label = name if spec is None else spec.name
    root = Path(root).expanduser()
    _check_root(label, root, spec)
    meta = load_meta(root)
    split = split.lower()
    if split not in meta:
        only = (
            f" ({spec.title} is published with a test split only)"
            if spec and not spec.has_train_split
            else ""
        )
        raise SplitNotFoundError(
            f"{root / META_FILENAME} has no '{split}' split{only}; it has {sorted(meta)}.\n"
            f"Fix: use split={sorted(meta)[0] if meta else 'test'}, or regenerate the index."
        )
    wanted = _select_categories(label, root, spec, meta, split, categories)
    table = read_meta_json(root, split=split, source=source or label, categories=wanted)

    if require_masks is None:
        require_masks = spec.has_masks if spec is not None else True
    if require_masks:
        _check_masks_present(label, table)
    if validate:
        validate_samples(table, dataset=label)
    anomalous = table.count(1)
    if split == "train" and anomalous:
        log.warning(
            "%s: the train split holds %d anomalous image(s); filter label == 0 if it must be normal-only data",
            label,
            anomalous,
        )
    if evaluated:
        warn_if_unscorable(table, label, split)
    return table


def warn_if_unscorable(samples: SampleTable, label: str, split: str) -> list[str]:
    """Warn, before any compute, about the categories of an evaluation set that lack normal or anomalous
    images: AUROC, AP, F1 and PRO are undefined there (the results show '–'). Returns those categories."""
    lacking = {
        category: [kind for kind, value in (("anomalous", 1), ("normal", 0)) if not table.count(value)]
        for category, table in samples.by_category().items()
    }
    lacking = {category: kinds for category, kinds in lacking.items() if kinds}
    if lacking:
        kinds = sorted({kind for missing in lacking.values() for kind in missing})
        if len(lacking) == len(samples.categories) and len(kinds) == 1:
            what = f"no category has {kinds[0]} images"
        else:
            what = f"categories {list(lacking)} lack {' or '.join(kinds)} images"
        fix = (
            "evaluate on the test split (dataset.split=test): a train split holds normal images only"
            if split == "train"
            else "add images of both kinds to those categories, or leave them out (dataset.categories=[...])"
        )
        log.warning(
            "%s [%s]: %s, so their detection metrics (AUROC, AP, F1, PRO) are undefined and show as '–'. "
            "Fix: %s.",
            label,
            split,
            what,
            fix,
        )
    return list(lacking)


def _check_root(label: str, root: Path, spec: DatasetSpec | None) -> None:
    if spec is not None:
        layout = spec.layout.rstrip()
        command = spec.prepare_command(root)
        fetch = f"Download: {spec.download}\n"
        place = (
            f"Fix: put the dataset at {root} (or set the dataset root to where it is), then run: {command}"
        )
        index = f"Fix: index it with: {command}"
    else:
        layout = _GENERIC_LAYOUT.rstrip()
        fetch = ""
        how = (
            "write ROOT/meta.json in the format above (anomret.data.meta.write_meta_json writes it). "
            f"'{label}' is not a dataset anomret can index by itself; if the folder is one of "
            f"{', '.join(DATASETS)}, run: python -m anomret.prepare <that name> {shlex.quote(str(root))}"
        )
        index = f"Fix: {how}"
        place = f"Fix: set the dataset root to the folder that holds your meta.json; to create one, {how}"
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetNotFoundError(
            f"dataset '{label}': root {root} {what}.\nExpected layout:\n{layout}\n{fetch}{place}"
        )
    if not (root / META_FILENAME).is_file():
        raise DatasetNotFoundError(
            f"dataset '{label}': {root / META_FILENAME} does not exist, so {root} has not been indexed.\n"
            f"Expected layout:\n{layout}\n{fetch}{index}"
        )


def _select_categories(
    label: str,
    root: Path,
    spec: DatasetSpec | None,
    meta: dict[str, dict[str, list]],
    split: str,
    categories: list[str] | None,
) -> list[str]:
    per_category = meta[split]
    if categories is None:
        if not any(per_category.values()):
            hint = (
                f" ({spec.title} is published with a test split only)"
                if spec is not None and not spec.has_train_split
                else ""
            )
            raise EmptyCategoryError(
                f"dataset '{label}': the '{split}' split of {root / META_FILENAME} is empty{hint}.\n"
                "Fix: use another split (e.g. split=test), or regenerate the index with the prepare command."
            )
        empty = [category for category, rows in per_category.items() if not rows]
        if empty:
            raise EmptyCategoryError(
                f"dataset '{label}': categories {empty} have no samples in the '{split}' split of "
                f"{root / META_FILENAME}.\n"
                f"Fix: select the others explicitly (categories={[c for c in per_category if per_category[c]]}) "
                "or remove the empty entries from meta.json."
            )
        return list(per_category)

    requested = [categories] if isinstance(categories, str) else list(categories)
    available = list(dict.fromkeys(category for split_rows in meta.values() for category in split_rows))
    unknown = [category for category in requested if category not in available]
    if unknown:
        raise UnknownCategoryError(
            f"dataset '{label}' has no categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
            f"available: {available}.\n"
            "Fix: pick categories from that list (names are case-sensitive)."
        )
    empty = [category for category in requested if not per_category.get(category)]
    if empty:
        elsewhere = {
            category: [other for other, rows in meta.items() if rows.get(category)] for category in empty
        }
        raise EmptyCategoryError(
            f"dataset '{label}': categories {empty} have no samples in the '{split}' split "
            f"(they have samples in: {elsewhere}).\n"
            "Fix: choose another split for them, or leave them out of categories."
        )
    return requested


def _check_masks_present(label: str, table: SampleTable) -> None:
    without = [sample.image_path for sample in table if sample.is_anomalous and sample.mask_path is None]
    if without:
        raise InvalidSampleError(
            f"dataset '{label}': {len(without)} anomalous image(s) have no mask, and this source requires "
            f"masks (pixel metrics / memory building):\n{format_paths(without)}\n"
            "Fix: add their mask_path in meta.json, or set require_masks=false for this source "
            "(dataset.require_masks=false) to use image-level labels only."
        )


def validate_samples(samples: SampleTable, *, dataset: str = "dataset") -> None:
    """Check, before any compute, that every image and every mask that will be read exists, can be read
    whole (a truncated file with an intact header is caught here, not midway through a run) and that each
    mask has the size of its image. :func:`~anomret.data.io.check_image` keeps this cheap: PNG files
    are checked by their chunk checksums, JPEG files by their end marker, without decoding.

    Masks of normal samples are never read (normal images get an all-zero mask) and are not checked.

    Raises:
        InvalidSampleError: missing files (the first few named, with the count), an unreadable,
            truncated or corrupt file, or a mask whose size differs from its image's.
    """
    used = [(sample, sample.mask_path if sample.is_anomalous else None) for sample in samples]
    missing = [sample.image_path for sample, _ in used if not sample.image_path.is_file()]
    missing += [mask for _, mask in used if mask is not None and not mask.is_file()]
    if missing:
        raise InvalidSampleError(
            f"dataset '{dataset}': {len(missing)} file(s) referenced by meta.json do not exist:\n"
            f"{format_paths(missing)}\n"
            "Fix: the dataset is incomplete or has moved; restore the files, or re-index it with "
            "python -m anomret.prepare NAME ROOT --force."
        )
    for sample, mask in used:
        size = _checked(sample.image_path, dataset)
        if mask is None:
            continue
        mask_size = _checked(mask, dataset)
        if mask_size != size:
            raise InvalidSampleError(
                f"dataset '{dataset}': mask and image sizes differ: image {sample.image_path} is "
                f"{size[0]}x{size[1]}, mask {mask} is {mask_size[0]}x{mask_size[1]} (width x height).\n"
                "Fix: the mask belongs to another image or was resized; correct the pairing in meta.json "
                "or re-create the mask at the image's size."
            )


def _checked(path: Path, dataset: str) -> tuple[int, int]:
    try:
        return check_image(path)
    except InvalidSampleError as error:
        message = str(error)
        if "Fix:" not in message:
            message += (
                "\nFix: re-download or re-extract the file, or remove it from the dataset and index it again "
                "(python -m anomret.prepare NAME ROOT --force)."
            )
        raise InvalidSampleError(f"dataset '{dataset}': {message}") from error
