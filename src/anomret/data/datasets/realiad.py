"""Real-IAD, indexed from its published JSON split files (``realiad_jsons``).

One JSON file per category, ``{"meta": {"normal_class": "OK", ...}, "train": [entry], "test": [entry]}``
with entries ``{"category", "anomaly_class", "image_path", "mask_path"}``; ``anomaly_class`` is
``"OK"`` for normal images (also for views of a defective sample where the defect is not visible)
and a defect code (``AK``, ``BX``, ...) otherwise. Paths are relative to the category folder of an
image set (``realiad_1024/<category>/``). RAD uses ``realiad_jsons`` (the multi-class split in which
every image, whatever its camera view, is a sample) with the 1024 px images; so does this reader.

Both published placements of the JSON folder are accepted: ``realiad_jsons/<category>.json`` and
``realiad_jsons/realiad_jsons/<category>.json`` (the archive extracted into a folder of its own name,
as the Dinomaly/RAD READMEs show). Image sets are looked for in the order ``realiad_1024``,
``realiad_512``, ``realiad_256``, ``realiad_raw`` (all share the JSON paths); paths that already start
with the category (``audiojack/OK/...``) are accepted too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from anomret.data.datasets.layout import DatasetSpec, MetaBuilder, check_exists, find_dir
from anomret.data.errors import InvalidSampleError
from anomret.data.meta import Meta

log = logging.getLogger(__name__)

REALIAD_CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood",
    "mint", "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug",
    "porcelain_doll", "regulator", "rolled_strip_base", "sim_card_set", "switch", "tape",
    "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "u_block",
    "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip

IMAGE_SETS = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw")
JSON_SET = "realiad_jsons"
NORMAL_CLASS = "OK"


def find_json_dir(root: Path) -> Path | None:
    """The folder holding the ``<category>.json`` files of ``realiad_jsons`` (nested or not)."""
    outer = find_dir(root, JSON_SET)
    if outer is None:
        return None
    for candidate in (find_dir(outer, JSON_SET), outer):
        if candidate is not None and any(candidate.glob("*.json")):
            return candidate
    return None


def read_realiad(root: Path, spec: DatasetSpec) -> Meta:
    json_dir = find_json_dir(root)
    if json_dir is None:
        raise spec.layout_error(root, f"no {JSON_SET}/<category>.json files (nor {JSON_SET}/{JSON_SET}/)")
    image_set = next((found for name in IMAGE_SETS if (found := find_dir(root, name)) is not None), None)
    if image_set is None:
        raise spec.layout_error(root, f"no image folder ({', '.join(IMAGE_SETS)})")

    files = {path.stem: path for path in sorted(json_dir.glob("*.json"))}
    strangers = sorted(set(files) - set(REALIAD_CATEGORIES))
    if strangers:
        log.warning(
            "%s: ignoring %s files that are not Real-IAD categories: %s", spec.name, json_dir, strangers
        )
    categories = [category for category in REALIAD_CATEGORIES if category in files]
    if not categories:
        raise spec.layout_error(root, f"{json_dir} holds no <category>.json of the 30 Real-IAD categories")
    missing = [category for category in REALIAD_CATEGORIES if category not in files]
    if missing:
        log.warning("%s: %d of 30 categories are absent: %s", spec.name, len(missing), missing)

    builder = MetaBuilder(root)
    referenced: list[Path] = []
    for category in categories:
        referenced += _read_category(builder, files[category], image_set, category, spec)
    check_exists(referenced, dataset=spec.name, source=f"the JSON files in {json_dir}")
    log.info("%s: images from %s, split from %s", spec.name, image_set, json_dir)
    return builder.result(spec)


def _read_category(
    builder: MetaBuilder, json_path: Path, image_set: Path, category: str, spec: DatasetSpec
) -> list[Path]:
    data = _load_json(json_path, spec)
    normal_class = str((data.get("meta") or {}).get("normal_class") or NORMAL_CLASS)
    base = image_set / category
    entries = [
        (split, entry) for split in ("train", "test") for entry in _entries(data, split, json_path, spec)
    ]
    if entries and not (base / entries[0][1]["image_path"]).is_file():
        first = entries[0][1]["image_path"]
        if (image_set / first).is_file():  # paths that start with the category folder
            base = image_set
    referenced: list[Path] = []
    for split, entry in entries:
        defect = str(entry.get("anomaly_class") or "")
        anomalous = defect != normal_class
        image = base / entry["image_path"]
        mask_path = entry.get("mask_path")
        if anomalous and not mask_path:
            raise InvalidSampleError(
                f"{spec.name}: {json_path} ({split}): anomalous image {image} (anomaly_class {defect!r}) has "
                "no mask_path.\nFix: restore the published realiad_jsons files."
            )
        mask = base / mask_path if anomalous and mask_path else None
        referenced.append(image)
        if mask is not None:
            referenced.append(mask)
        builder.add(split, category, image, mask, int(anomalous), defect)
    return referenced


def _load_json(path: Path, spec: DatasetSpec) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise InvalidSampleError(
            f"{spec.name}: {path} is not valid JSON ({error}).\nFix: re-extract realiad_jsons.zip."
        ) from error
    if not isinstance(data, dict) or "test" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InvalidSampleError(
            f"{spec.name}: {path} is not a Real-IAD split file: expected keys 'train' and 'test', got {keys}.\n"
            "Fix: point ROOT at the folder holding realiad_jsons/ from the Real-IAD release."
        )
    return data


def _entries(data: dict[str, Any], split: str, path: Path, spec: DatasetSpec) -> list[dict[str, Any]]:
    entries = data.get(split) or []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("image_path") or "anomaly_class" not in entry:
            raise InvalidSampleError(
                f"{spec.name}: {path} {split}[{index}] = {entry!r} lacks image_path or anomaly_class.\n"
                "Fix: restore the published realiad_jsons files."
            )
    return entries


SPECS = (
    DatasetSpec(
        name="realiad",
        title="Real-IAD",
        description=(
            "Real-IAD: 30 industrial object categories photographed from 5 camera views, with pixel masks. "
            "Indexed from the published realiad_jsons split (as RAD uses it): train = normal images, "
            "test = normal + anomalous; the defect code (AK, BX, ...) is the defect type."
        ),
        layout=(
            "ROOT/\n"
            "  realiad_1024/audiojack/OK/S0001/audiojack_0001_OK_C1_<time>.jpg\n"
            "  realiad_1024/audiojack/NG/<defect>/S0011/<...>_C1_<time>.jpg  (+ the .png mask beside it)\n"
            "  realiad_1024/bottle_cap/ ... (30 categories; realiad_512, realiad_256 or realiad_raw also work)\n"
            "  realiad_jsons/realiad_jsons/audiojack.json   (or realiad_jsons/audiojack.json)\n"
        ),
        download=(
            "https://realiad4ad.github.io/Real-IAD/ (access on request; realiad_1024 and realiad_jsons; "
            "ROOT is the folder holding both)"
        ),
        reader=read_realiad,
        categories=REALIAD_CATEGORIES,
        has_masks=True,
        has_train_split=True,
        aliases=("real-iad", "real_iad"),
    ),
)
