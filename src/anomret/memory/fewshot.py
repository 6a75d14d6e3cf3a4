"""Which memory images a few-shot or data-scaling run keeps: a seeded draw per category."""

from __future__ import annotations

import logging
import zlib

import torch

from anomret.data.samples import SampleTable

log = logging.getLogger(__name__)

# Stored rows: in memory, memory-mapped from a bank file, or read from a memory pass's scratch files.


def select_images(
    samples: SampleTable,
    *,
    shots: int | None = None,
    fraction: float | None = None,
    categories: list[str] | None = None,
    seed: int = 0,
) -> SampleTable:
    """The memory images of a few-shot or data-scaling run, in the source's order.

    Per category (only those in ``categories`` when given; the others are kept whole), a seeded random
    draw keeps ``shots`` images, or ``max(1, round(fraction × n))``. The draw depends on the seed and
    the category only, and a larger budget keeps a superset of a smaller one.
    """
    if shots is None and fraction is None:
        return samples
    chosen: set[int] = set()
    groups: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.category, []).append(position)
    unknown = sorted(set(categories or []) - set(groups))
    if unknown:
        raise ValueError(
            f"memory.subset_categories names {unknown}, which the memory source does not hold "
            f"(it has {sorted(groups)})"
        )
    for category, positions in groups.items():
        if categories is not None and category not in categories:
            chosen.update(positions)
            continue
        if shots is not None:
            n = shots
        else:
            assert fraction is not None  # one of them is set (without either, all samples returned above)
            n = max(1, round(float(fraction) * len(positions)))
        ordered = sorted(positions, key=lambda p: str(samples[p].image_path))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(category.encode()))
        permutation = torch.randperm(len(ordered), generator=generator).tolist()
        chosen.update(ordered[i] for i in permutation[: min(n, len(ordered))])
    return SampleTable([samples[p] for p in sorted(chosen)])
