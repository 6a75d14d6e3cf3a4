"""The category-aware sample table: one row per image, the single currency of the data layer.

Readers (meta.json, folder layouts) produce a ``SampleTable``; datasets, memory builders and the
per-category evaluation consume it. Paths are absolute once a table is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsIndex, overload

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image_path: absolute path of the image file.
        mask_path: absolute path of the pixel mask, or ``None`` (normal image, or a dataset with
            image-level labels only).
        category: object/texture class the image belongs to (``bottle``, ``pcb1``, ...).
        label: 0 normal, 1 anomalous.
        split: ``train`` or ``test``.
        source: name of the dataset the row comes from (``mvtec``, ``visa``, ``synthetic_a``...).
        defect: defect type (``scratch``, ``good``...) or ``""`` when the dataset does not say.
    """

    image_path: Path
    mask_path: Path | None
    category: str
    label: int
    split: str
    source: str
    defect: str = ""

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS


class SampleTable(Sequence[Sample]):
    """An ordered, immutable collection of samples with category-aware helpers."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self._samples: tuple[Sample, ...] = tuple(samples)

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: SupportsIndex) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> SampleTable: ...
    def __getitem__(self, index: SupportsIndex | slice) -> Sample | SampleTable:
        if isinstance(index, slice):
            return SampleTable(self._samples[index])
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __add__(self, other: SampleTable) -> SampleTable:
        return SampleTable(self._samples + tuple(other))

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} samples, categories={self.categories})"

    @property
    def categories(self) -> list[str]:
        """Categories in order of first appearance."""
        return list(dict.fromkeys(sample.category for sample in self._samples))

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(sample.source for sample in self._samples))

    def filter(
        self,
        *,
        split: str | None = None,
        categories: Iterable[str] | None = None,
        label: int | None = None,
    ) -> SampleTable:
        wanted = None if categories is None else set(categories)
        return SampleTable(
            sample
            for sample in self._samples
            if (split is None or sample.split == split)
            and (wanted is None or sample.category in wanted)
            and (label is None or sample.label == label)
        )

    def by_category(self) -> dict[str, SampleTable]:
        groups: dict[str, list[Sample]] = {}
        for sample in self._samples:
            groups.setdefault(sample.category, []).append(sample)
        return {name: SampleTable(rows) for name, rows in groups.items()}

    def count(self, label: int | None = None) -> int:
        return sum(1 for sample in self._samples if label is None or sample.label == label)

    @property
    def has_masks(self) -> bool:
        """True when every anomalous sample comes with a pixel mask."""
        anomalous = [s for s in self._samples if s.is_anomalous]
        return bool(anomalous) and all(s.mask_path is not None for s in anomalous)
