"""Errors of the data layer.

Every message says what is wrong, which file or dataset it concerns and how to fix it, because these
errors are read by someone at a terminal who has just pointed a run at a folder on their disk.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataError(Exception):
    """Base class: a dataset, index or sample cannot be used as it is."""


class DatasetNotFoundError(DataError):
    """A dataset root, or its ``meta.json`` index, is not where the configuration says."""


class LayoutError(DatasetNotFoundError):
    """A dataset root exists but does not hold the folder layout the dataset is published with."""


class InvalidSampleError(DataError):
    """One sample cannot be used: unreadable file, missing or mismatched mask, bad record."""


class EmptyCategoryError(DataError):
    """A selected category (or a whole split) has no samples."""


class SplitNotFoundError(DataError, KeyError):
    """A dataset index has no such split (``train``/``test``)."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


class UnknownCategoryError(DataError, ValueError):
    """A requested category does not exist in the dataset."""


class UnknownDatasetError(DataError, ValueError):
    """A dataset name is not one the prepare command knows how to read."""


def format_paths(paths: Sequence[object], limit: int = 5, indent: str = "  ") -> str:
    """List the first ``limit`` paths one per line, then say how many more there are."""
    lines = [f"{indent}{path}" for path in paths[:limit]]
    if len(paths) > limit:
        lines.append(f"{indent}... and {len(paths) - limit} more ({len(paths)} in all)")
    return "\n".join(lines)
