"""Builders of tiny fake dataset trees, one per published layout, for tests.

Each ``build_<name>(parent)`` writes a few 16x16 images (and masks) under ``parent/<name>`` laid out
as the real dataset is published, and returns a :class:`FakeTree` with the counts the prepare
command must find. ``build_tree(name, parent)`` dispatches by dataset name; ``BUILDERS`` lists them.

Masks hold a filled rectangle (value 255, or small class ids for VisA) and always have the size of
their image, so that trees pass validation unless a test breaks them on purpose.

The root conftest puts ``tests/`` on ``sys.path``, so tests elsewhere import these builders as
``from data.fake_trees import build_tree``; tests in this package use ``from .fake_trees import ...``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16

# split -> category -> (normal, anomalous, with mask)
Counts = dict[str, dict[str, tuple[int, int, int]]]


@dataclass
class FakeTree:
    """A fake dataset on disk and what indexing it must yield."""

    name: str
    root: Path
    expected: Counts
    # Relative paths of (image, mask) pairs that indexing must produce, checked by the prepare tests.
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(c for split in self.expected.values() for c in split))


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (SIZE, SIZE), gray: bool = False) -> Path:
    """A random image of ``size`` = (width, height); the format follows the extension."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_mask(
    path: Path,
    box: tuple[int, int, int, int] | None = (4, 4, 10, 10),
    size: tuple[int, int] = (SIZE, SIZE),
    value: int = 255,
) -> Path:
    """A mask of ``size`` with ``box`` = (top, left, bottom, right) set to ``value`` (blank if None)."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    if box is not None:
        top, left, bottom, right = box
        array[top:bottom, left:right] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _mvtec_like(
    root: Path,
    categories: tuple[str, ...],
    *,
    normal: str = "good",
    defects: tuple[str, ...] = ("broken", "crack"),
    image_ext: str = ".png",
    mask_name: Callable[[str], str] = lambda stem: f"{stem}_mask.png",
    train: int = 2,
    test_normal: int = 1,
    per_defect: int = 2,
) -> tuple[Counts, list[tuple[str, str]]]:
    counts: Counts = {"train": {}, "test": {}}
    pairs: list[tuple[str, str]] = []
    seed = 0
    for category in categories:
        for i in range(train):
            write_image(root / category / "train" / normal / f"{i:03d}{image_ext}", seed := seed + 1)
        for i in range(test_normal):
            write_image(root / category / "test" / normal / f"{i:03d}{image_ext}", seed := seed + 1)
        for defect in defects:
            for i in range(per_defect):
                stem = f"{i:03d}"
                image = write_image(
                    root / category / "test" / defect / f"{stem}{image_ext}", seed := seed + 1
                )
                mask = write_mask(root / category / "ground_truth" / defect / mask_name(stem))
                pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
        anomalous = len(defects) * per_defect
        if train:
            counts["train"][category] = (train, 0, 0)
        counts["test"][category] = (test_normal, anomalous, anomalous)
    return counts, pairs


def build_mvtec(parent: Path) -> FakeTree:
    root = parent / "mvtec"
    counts, pairs = _mvtec_like(root, ("bottle", "wood"))
    return FakeTree("mvtec", root, counts, pairs)


def build_mpdd(parent: Path) -> FakeTree:
    root = parent / "mpdd"
    counts, pairs = _mvtec_like(root, ("bracket_black", "tubes"), defects=("hole",))
    return FakeTree("mpdd", root, counts, pairs)


def build_btad(parent: Path) -> FakeTree:
    root = parent / "btad"
    # Category 01: .bmp images with .png masks; 03: .bmp images and .bmp masks; both share stems.
    c1, p1 = _mvtec_like(
        root, ("01",), normal="ok", defects=("ko",), image_ext=".bmp", mask_name=lambda s: f"{s}.png"
    )
    c3, p3 = _mvtec_like(
        root, ("03",), normal="ok", defects=("ko",), image_ext=".bmp", mask_name=lambda s: f"{s}.bmp"
    )
    counts = {split: {**c1[split], **c3[split]} for split in ("train", "test")}
    return FakeTree("btad", root, counts, p1 + p3)


def build_dtd(parent: Path) -> FakeTree:
    root = parent / "dtd"
    counts, pairs = _mvtec_like(root, ("Woven_001", "Blotchy_099"), defects=("bad",))
    return FakeTree("dtd", root, counts, pairs)


def build_visa(parent: Path) -> FakeTree:
    root = parent / "visa"
    rows = ["object,split,label,image,mask"]
    counts: Counts = {"train": {}, "test": {}}
    pairs: list[tuple[str, str]] = []
    seed = 100
    for category in ("candle", "pcb1"):
        base = f"{category}/Data"
        for i in range(3):
            image = f"{base}/Images/Normal/{i:04d}.JPG"
            write_image(root / image, seed := seed + 1)
            rows.append(f"{category},{'train' if i < 2 else 'test'},normal,{image},")
        for i in range(2):
            image, mask = f"{base}/Images/Anomaly/{i:03d}.JPG", f"{base}/Masks/Anomaly/{i:03d}.png"
            write_image(root / image, seed := seed + 1)
            write_mask(root / mask, value=i + 1)  # VisA masks hold class ids, not 255
            rows.append(f"{category},test,anomaly,{image},{mask}")
            pairs.append((image, mask))
        counts["train"][category] = (2, 0, 0)
        counts["test"][category] = (1, 2, 2)
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return FakeTree("visa", root, counts, pairs)


def build_sdd(parent: Path) -> FakeTree:
    root = parent / "sdd"
    pairs = []
    seed = 200
    for kos, defective in (("kos01", 1), ("kos02", 2)):
        for part in range(3):
            image = write_image(root / kos / f"Part{part}.jpg", seed := seed + 1, gray=True)
            mask = write_mask(
                root / kos / f"Part{part}_label.bmp", box=(2, 2, 6, 6) if part == defective else None
            )
            if part == defective:
                pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
    return FakeTree("sdd", root, {"train": {}, "test": {"electrical commutators": (4, 2, 2)}}, pairs)


def build_ksdd2(parent: Path) -> FakeTree:
    root = parent / "ksdd2"
    pairs = []
    seed = 300
    for split, first in (("train", 10000), ("test", 20000)):
        for i in range(3):
            image = write_image(root / split / f"{first + i}.png", seed := seed + 1)
            mask = write_mask(root / split / f"{first + i}_GT.png", box=(1, 1, 5, 5) if i == 1 else None)
            if i == 1:
                pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
    counts = {"train": {"electrical commutators": (2, 1, 1)}, "test": {"electrical commutators": (2, 1, 1)}}
    return FakeTree("ksdd2", root, counts, pairs)


def build_dagm(parent: Path) -> FakeTree:
    root = parent / "dagm"
    pairs = []
    counts: Counts = {"train": {}, "test": {}}
    seed = 400
    for category in ("Class1", "Class2"):
        for split in ("Train", "Test"):
            for i in range(1, 4):
                image = write_image(root / category / split / f"{i:04d}.PNG", seed := seed + 1, gray=True)
                if i == 2:
                    mask = write_mask(root / category / split / "Label" / f"{i:04d}_label.PNG")
                    pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
            (root / category / split / "Label" / "Labels.txt").write_text(
                "1\n2\t1\t0002.PNG\t0\t0002_label.PNG\n"
            )
            counts[split.lower()][category] = (2, 1, 1)
    return FakeTree("dagm", root, counts, pairs)


def build_headct(parent: Path) -> FakeTree:
    root = parent / "headct"
    labels = {0: 1, 1: 1, 2: 0, 3: 0}
    for index in labels:
        write_image(root / "head_ct" / "head_ct" / f"{index:03d}.png", 500 + index, gray=True)
    # The published CSV header has a space before "hemorrhage".
    (root / "labels.csv").write_text("id, hemorrhage\n" + "".join(f"{i},{v}\n" for i, v in labels.items()))
    return FakeTree("headct", root, {"train": {}, "test": {"brain": (2, 2, 0)}})


def build_brainmri(parent: Path) -> FakeTree:
    root = parent / "brainmri"
    for base in (root / "brain_tumor_dataset", root):  # the Kaggle archive holds both copies
        write_image(base / "yes" / "Y1.jpg", 600)
        write_image(base / "yes" / "Y2.JPG", 601, size=(20, 12))
        write_image(base / "no" / "1 no.jpeg", 602, gray=True)
    return FakeTree("brainmri", root, {"train": {}, "test": {"brain": (1, 2, 0)}})


def build_br35h(parent: Path) -> FakeTree:
    root = parent / "br35h"
    for i in range(2):
        write_image(root / "yes" / f"y{i}.jpg", 700 + i)
        write_image(root / "no" / f"no{i}.jpg", 710 + i)
    write_image(root / "pred" / "pred0.jpg", 720)
    return FakeTree("br35h", root, {"train": {}, "test": {"brain": (2, 2, 0)}})


def build_isic(parent: Path) -> FakeTree:
    root = parent / "isic"
    pairs = []
    for i in range(3):
        stem = f"ISIC_{i:07d}"
        image = write_image(root / "ISBI2016_ISIC_Part1_Test_Data" / f"{stem}.jpg", 800 + i)
        mask = write_mask(root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{stem}_Segmentation.png")
        pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
    return FakeTree("isic", root, {"train": {}, "test": {"skin": (0, 3, 3)}}, pairs)


def _images_and_masks(
    name: str, base: Path, root: Path, stems: list[str], image_ext: str, mask_ext: str
) -> FakeTree:
    pairs = []
    for i, stem in enumerate(stems):
        image = write_image(base / "images" / f"{stem}{image_ext}", 900 + i)
        mask = write_mask(base / "masks" / f"{stem}{mask_ext}")
        pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
    return FakeTree(name, root, {"train": {}, "test": {"colon": (0, len(stems), len(stems))}}, pairs)


def build_colondb(parent: Path) -> FakeTree:
    root = parent / "colondb"
    # ROOT above the archive's TestDataset/ folder; "1" and "10" catch sorted-order pairing.
    return _images_and_masks(
        "colondb", root / "TestDataset" / "CVC-ColonDB", root, ["1", "2", "10"], ".png", ".png"
    )


def build_clinicdb(parent: Path) -> FakeTree:
    root = parent / "clinicdb"
    return _images_and_masks("clinicdb", root, root, ["1", "2"], ".png", ".png")


def build_kvasir(parent: Path) -> FakeTree:
    root = parent / "kvasir"
    stems = ["cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4"]
    return _images_and_masks("kvasir", root, root, stems, ".jpg", ".jpg")


def build_endo(parent: Path) -> FakeTree:
    root = parent / "endo"
    return _images_and_masks("endo", root, root, ["a1", "b2"], ".jpg", ".png")


def build_realiad(parent: Path, *, nested_jsons: bool = True, category_in_paths: bool = False) -> FakeTree:
    """Real-IAD: realiad_1024/<category>/{OK,NG/<code>}/S<id>/*.jpg (+ .png masks), split by JSON files.

    ``nested_jsons``: ``realiad_jsons/realiad_jsons/<category>.json`` (else ``realiad_jsons/<category>.json``);
    ``category_in_paths``: JSON paths start with the category folder (else relative to it).
    """
    import json

    root = parent / "realiad"
    json_dir = root / "realiad_jsons" / "realiad_jsons" if nested_jsons else root / "realiad_jsons"
    json_dir.mkdir(parents=True)
    counts: Counts = {"train": {}, "test": {}}
    pairs: list[tuple[str, str]] = []
    seed = 1000
    for category in ("audiojack", "pcb"):
        base = root / "realiad_1024" / category
        splits: dict[str, list[dict]] = {"train": [], "test": []}

        def entry(image: str, defect: str, mask: str | None, category: str = category) -> dict:
            prefix = f"{category}/" if category_in_paths else ""
            return {
                "category": category,
                "anomaly_class": defect,
                "image_path": prefix + image,
                "mask_path": prefix + mask if mask else None,
            }

        for i in range(3):  # two normal train images, one normal test image
            image = f"OK/S{i:04d}/{category}_{i:04d}_OK_C1_2023.jpg"
            write_image(base / image, seed := seed + 1)
            splits["train" if i < 2 else "test"].append(entry(image, "OK", None))
        for i, code in enumerate(("AK", "BX")):
            stem = f"NG/{code}/S{10 + i:04d}/{category}_{10 + i:04d}_NG_{code}_C2_2023"
            write_image(base / f"{stem}.jpg", seed := seed + 1)
            write_mask(base / f"{stem}.png")
            splits["test"].append(entry(f"{stem}.jpg", code, f"{stem}.png"))
            pairs.append((f"realiad_1024/{category}/{stem}.jpg", f"realiad_1024/{category}/{stem}.png"))
        # Another view of a defective sample in which the defect is not visible: labelled OK, no mask.
        hidden = f"NG/AK/S0010/{category}_0010_NG_AK_C5_2023.jpg"
        write_image(base / hidden, seed := seed + 1)
        splits["test"].append(entry(hidden, "OK", None))
        meta = {"prefix": "", "normal_class": "OK"}
        (json_dir / f"{category}.json").write_text(json.dumps({"meta": meta, **splits}))
        counts["train"][category] = (2, 0, 0)
        counts["test"][category] = (2, 2, 2)
    return FakeTree("realiad", root, counts, pairs)


def build_3dadam(parent: Path) -> FakeTree:
    """3D-ADAM as on the hub: <category>/{train,validation,test}/<type>/{rgb,xyz,ground_truth}/."""
    root = parent / "3dadam"
    counts: Counts = {"train": {}, "test": {}}
    pairs: list[tuple[str, str]] = []
    seed = 1100
    for category in ("1m1", "gripper_open"):
        base = root / category
        for split, n in (("train", 2), ("validation", 1)):
            for i in range(n):
                write_image(base / split / "good" / "rgb" / f"{i:03d}.png", seed := seed + 1)
                (base / split / "good" / "xyz").mkdir(parents=True, exist_ok=True)
                (base / split / "good" / "xyz" / f"{i:03d}.tiff").write_bytes(b"II*\x00")  # not read
        for defect in ("cut", "hole"):
            for i in range(2):
                image = write_image(base / "test" / defect / "rgb" / f"{i:03d}.png", seed := seed + 1)
                mask = write_mask(base / "test" / defect / "ground_truth" / f"{i:03d}.png")
                pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()))
        counts["train"][category] = (2, 0, 0)
        counts["test"][category] = (1, 4, 4)
    return FakeTree("3dadam", root, counts, pairs)


BUILDERS: dict[str, Callable[[Path], FakeTree]] = {
    "mvtec": build_mvtec,
    "visa": build_visa,
    "btad": build_btad,
    "mpdd": build_mpdd,
    "dtd": build_dtd,
    "sdd": build_sdd,
    "ksdd2": build_ksdd2,
    "dagm": build_dagm,
    "headct": build_headct,
    "brainmri": build_brainmri,
    "br35h": build_br35h,
    "isic": build_isic,
    "colondb": build_colondb,
    "clinicdb": build_clinicdb,
    "kvasir": build_kvasir,
    "endo": build_endo,
    "realiad": build_realiad,
    "3dadam": build_3dadam,
}


def build_tree(name: str, parent: Path) -> FakeTree:
    """Build the fake tree of dataset ``name`` under ``parent/<name>``."""
    return BUILDERS[name](parent)


def count(meta: dict) -> Counts:
    """The (normal, anomalous, with mask) counts of a meta.json structure, as in ``FakeTree.expected``."""
    return {
        split: {
            category: (
                sum(1 for r in rows if not r["anomaly"]),
                sum(1 for r in rows if r["anomaly"]),
                sum(1 for r in rows if r["mask_path"]),
            )
            for category, rows in (meta.get(split) or {}).items()
        }
        for split in ("train", "test")
    }
