"""Shared machinery of the dataset readers: the spec of a benchmark, file listing, stem pairing,
the MVTec-style folder walker and the collector of meta.json records.

A reader turns a dataset root, laid out as the dataset is published, into the meta.json structure
``{"train": {category: [record]}, "test": {category: [record]}}`` (see :mod:`anomret.data.meta`). It
reads folder listings only, except where the published layout encodes labels in the masks
themselves (KolektorSDD, KolektorSDD2, DAGM), where masks are decoded once.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anomret.data.errors import InvalidSampleError, LayoutError, format_paths
from anomret.data.meta import Meta, Record, make_record

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Suffixes that published datasets append to the image stem to name its mask:
# MVTec/MPDD ``000_mask``, KolektorSDD/DAGM ``Part0_label``, KolektorSDD2 ``10000_GT``,
# ISIC ``ISIC_0000003_Segmentation``. Compared case-insensitively.
MASK_SUFFIXES = ("_mask", "_label", "_gt", "_segmentation")

Reader = Callable[[Path, "DatasetSpec"], Meta]


@dataclass(frozen=True)
class DatasetSpec:
    """What anomret knows about one published benchmark.

    Attributes:
        name: CLI/config name (lower case), e.g. ``mvtec``.
        title: the dataset's own name, e.g. ``MVTec AD``.
        description: one paragraph: what it is and how anomret indexes it.
        layout: a short tree sketch of the folder the prepare command expects as ROOT.
        download: where (and how) to get it.
        reader: ``(root, spec) -> meta`` for the published layout.
        categories: the fixed category names, or ``None`` when they are discovered.
        has_masks: anomalous images come with pixel masks (pixel metrics make sense).
        has_train_split: the published layout has a train split, written to meta.json's ``train``.
        aliases: other accepted names (case-insensitive).
    """

    name: str
    title: str
    description: str
    layout: str
    download: str
    reader: Reader
    categories: tuple[str, ...] | None
    has_masks: bool
    has_train_split: bool
    aliases: tuple[str, ...] = ()

    def read(self, root: Path) -> Meta:
        """Index ``root`` as this dataset (raises :class:`LayoutError` when it does not fit)."""
        return self.reader(Path(root), self)

    def prepare_command(self, root: str | Path) -> str:
        """The shell command that indexes ``root`` as this dataset (quoted for copy and paste)."""
        return f"python -m anomret.prepare {self.name} {shlex.quote(str(root))}"

    def layout_error(self, root: Path, problem: str) -> LayoutError:
        """A :class:`LayoutError` saying what was found, what was expected and where to get it."""
        hint = ""
        children = subdirs(root)
        own = [child.name for child in mvtec_style_dirs(root)] if self.name != "folder" else []
        if own:
            # Categories of one's own in MVTec layout: the generic reader indexes them, whatever their names.
            hint = (
                f"Note: {root} holds MVTec-style category folders ({', '.join(own[:5])}); if they are your own "
                f"categories, index them with: python -m anomret.prepare folder {shlex.quote(str(root))}\n"
            )
        elif len(children) == 1 and not list_images(root):
            # A frequent slip: ROOT is the folder the archive was extracted into, one level too high.
            hint = f"Note: {root} holds a single folder, {children[0].name}/; is that the dataset root?\n"
        return LayoutError(
            f"{root} does not look like {self.title} ('{self.name}'): {problem}\n"
            f"Expected layout (ROOT is the folder you pass):\n{self.layout.rstrip()}\n"
            f"{hint}"
            f"Download: {self.download}\n"
            f"Fix: point ROOT at the folder shown as ROOT above, then run: {self.prepare_command(root)}"
        )


@dataclass
class MetaBuilder:
    """Collects records for meta.json with paths relative to ``root``, in insertion order."""

    root: Path
    meta: Meta = field(default_factory=lambda: {"train": {}, "test": {}})

    def add(
        self,
        split: str,
        category: str,
        image: Path,
        mask: Path | None,
        anomaly: int,
        defect: str = "",
    ) -> None:
        record = make_record(
            self.relative(image), self.relative(mask) if mask is not None else "", category, anomaly, defect
        )
        self.meta[split].setdefault(category, []).append(record)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def records(self) -> list[Record]:
        return [record for split in self.meta.values() for rows in split.values() for record in rows]

    def result(self, spec: DatasetSpec) -> Meta:
        """The collected meta, or a :class:`LayoutError` when no image was found at all."""
        if not self.records():
            raise spec.layout_error(self.root, "no images were found")
        return self.meta


def natural_key(name: str) -> tuple:
    """Sort key that orders ``Part2`` before ``Part10``."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder`` in natural order (empty when it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(
        (child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")),
        key=lambda child: natural_key(child.name),
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, natural order; hidden files (``._x.png`` from macOS
    archives, ``.DS_Store``) and non-images (``Labels.txt``, ``Thumbs.db``) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        (
            child
            for child in folder.iterdir()
            if child.is_file() and not child.name.startswith(".") and child.suffix.lower() in IMAGE_EXTENSIONS
        ),
        key=lambda child: natural_key(child.name),
    )


def find_dir(root: Path, *names: str) -> Path | None:
    """The first of ``root/name`` that is a folder, matching names case-insensitively."""
    children = {child.name.lower(): child for child in subdirs(root)}
    for name in names:
        if (root / name).is_dir():
            return root / name
        if name.lower() in children:
            return children[name.lower()]
    return None


def mask_key(mask: Path) -> str:
    """The image stem a mask file refers to: its own stem without a known mask suffix."""
    stem = mask.stem.lower()
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_by_stem(
    images: Sequence[Path],
    masks: Sequence[Path],
    *,
    dataset: str,
    mask_dir: Path,
    require_all: bool = True,
) -> dict[Path, Path]:
    """Pair each image with the mask of the same stem (``000.png`` <-> ``000_mask.png``/``000.png``).

    Pairing by name, never by sorted position, so that one missing or extra file cannot shift every
    later pair onto the wrong image.

    Args:
        images: images that should have masks (the anomalous ones).
        masks: candidate mask files.
        dataset: dataset name, for messages.
        mask_dir: where the masks of these images are expected, for messages.
        require_all: an image without a mask is an error (otherwise it is left out of the result).

    Raises:
        InvalidSampleError: a mask with no image, two masks for one image, or (``require_all``) an
            image without a mask. The message names both sides.
    """
    by_stem: dict[str, Path] = {}
    for mask in masks:
        key = mask.stem.lower()
        if key in by_stem:
            raise _duplicate_mask(dataset, by_stem[key], mask)
        by_stem[key] = mask
    by_key: dict[str, list[Path]] = {}
    for mask in masks:
        by_key.setdefault(mask_key(mask), []).append(mask)

    pairs: dict[Path, Path] = {}
    for image in images:
        stem = image.stem.lower()
        # An exact stem match wins ("000.png" mask for "000.png"), then a suffixed one ("000_mask").
        found = by_stem.get(stem)
        if found is None:
            candidates = [m for m in by_key.get(stem, []) if m.stem.lower() != stem]
            if len(candidates) > 1:
                raise _duplicate_mask(dataset, *candidates[:2])
            found = candidates[0] if candidates else None
        if found is None:
            if require_all:
                raise InvalidSampleError(
                    f"{dataset}: anomalous image {image} has no mask.\n"
                    f"Expected a mask with the same stem in {mask_dir} (e.g. {mask_dir / (image.stem + '_mask.png')} "
                    f"or {mask_dir / (image.stem + '.png')}).\n"
                    "Fix: restore the missing mask from the original archive, or remove the image."
                )
            continue
        pairs[image] = found

    used = set(pairs.values())
    orphans = [mask for mask in masks if mask not in used]
    if orphans:
        image_dir = images[0].parent if images else None
        where = f"in {image_dir}" if image_dir is not None else "(no images in the matching folder)"
        first = orphans[0]
        raise InvalidSampleError(
            f"{dataset}: {len(orphans)} mask(s) have no image with the same stem {where}:\n"
            f"{format_paths(orphans)}\n"
            f"e.g. mask {first} expects an image named '{mask_key(first)}.<ext>' "
            f"{'at ' + str(image_dir / (mask_key(first) + '.png')) if image_dir else ''}.\n"
            "Fix: restore the missing images from the original archive, or delete the stray masks."
        )
    return pairs


def _duplicate_mask(dataset: str, first: Path, second: Path) -> InvalidSampleError:
    return InvalidSampleError(
        f"{dataset}: two masks claim the same image: {first} and {second}.\n"
        "Fix: keep one of them (an extracted archive copied twice, or a converted copy beside the original)."
    )


def read_mvtec_category(
    builder: MetaBuilder,
    category_dir: Path,
    category: str,
    *,
    dataset: str,
    normal_dirs: Iterable[str] = ("good",),
    has_masks: bool = True,
    splits: Iterable[str] = ("train", "test"),
) -> None:
    """Index one MVTec-style category folder::

        category_dir/{train,test}/<defect>/<stem>.<ext>     (a normal_dirs folder holds normal images)
        category_dir/ground_truth/<defect>/<stem>[_mask].<ext>

    Masks are paired by stem. ``ground_truth`` folders of normal types are ignored; a ``ground_truth``
    folder with no matching image folder is an error (its masks have no images).
    """
    normal = {name.lower() for name in normal_dirs}
    truth_dir = find_dir(category_dir, "ground_truth")
    anomalous_types: set[str] = set()
    before = len(builder.records())
    for split in splits:
        split_dir = find_dir(category_dir, split)
        if split_dir is None:
            continue
        loose = list_images(split_dir)
        if loose:
            log.warning(
                "%s: %d image(s) directly in %s are ignored: images go in one sub-folder per type "
                "(e.g. %s/good/)",
                dataset,
                len(loose),
                split_dir,
                split_dir,
            )
        for type_dir in subdirs(split_dir):
            images = list_images(type_dir)
            if type_dir.name.lower() in normal:
                for image in images:
                    builder.add(split, category, image, None, 0, type_dir.name)
                continue
            anomalous_types.add(type_dir.name.lower())
            pairs: dict[Path, Path] = {}
            if has_masks:
                mask_dir = (truth_dir or category_dir / "ground_truth") / type_dir.name
                found = find_dir(truth_dir, type_dir.name) if truth_dir is not None else None
                masks = list_images(found) if found is not None else []
                pairs = pair_by_stem(images, masks, dataset=dataset, mask_dir=found or mask_dir)
            for image in images:
                builder.add(split, category, image, pairs.get(image), 1, type_dir.name)
    if len(builder.records()) == before:
        log.warning(
            "%s: category folder %s holds no images (looked in %s); it is left out of meta.json",
            dataset,
            category_dir,
            ", ".join(f"{split}/<type>/" for split in splits),
        )
    if has_masks and truth_dir is not None:
        for type_dir in subdirs(truth_dir):
            name = type_dir.name.lower()
            if name in normal or name in anomalous_types:
                continue
            masks = list_images(type_dir)
            if masks:
                raise InvalidSampleError(
                    f"{dataset}: masks in {type_dir} have no images: there is no "
                    f"{category_dir / 'test' / type_dir.name} folder.\n"
                    f"{format_paths(masks, limit=3)}\n"
                    "Fix: restore the image folder from the original archive, or delete the stray mask folder."
                )


def mvtec_style_dirs(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that look like MVTec-style categories (they hold a ``test`` folder)."""
    return [child for child in subdirs(root) if find_dir(child, "test") is not None]


def read_converted_single(
    root: Path,
    spec: DatasetSpec,
    category: str,
    *,
    normal_dirs: Iterable[str] = ("good",),
) -> Meta | None:
    """Read the MVTec-style tree that the AnomalyCLIP/AdaCLIP preprocessing scripts write for
    single-category datasets (``ROOT/<any name>/{train,test}/{good,<defect>}``, ``ground_truth/``),
    under the canonical ``category`` name. ``None`` when ``root`` holds no such tree."""
    candidates = mvtec_style_dirs(root)
    if not candidates:
        return None
    if len(candidates) > 1:
        names = ", ".join(child.name for child in candidates)
        raise spec.layout_error(
            root, f"found several MVTec-style category folders ({names}) but {spec.title} has one category"
        )
    builder = MetaBuilder(root)
    read_mvtec_category(
        builder, candidates[0], category, dataset=spec.name, normal_dirs=normal_dirs, has_masks=spec.has_masks
    )
    log.info("%s: read the converted MVTec-style layout in %s", spec.name, candidates[0])
    return builder.result(spec)


def check_exists(paths: Iterable[Path], *, dataset: str, source: str) -> None:
    """Raise when files named by an index (e.g. a CSV split file) are missing."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise InvalidSampleError(
            f"{dataset}: {len(missing)} file(s) listed in {source} do not exist:\n{format_paths(missing)}\n"
            "Fix: the archive was not fully extracted, or ROOT is not its top folder; re-extract it."
        )
