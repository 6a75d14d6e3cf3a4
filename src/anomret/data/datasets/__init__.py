"""One reader per benchmark family, each turning a published folder layout into meta.json records.

``DATASETS`` maps the dataset names used on the command line and in configs to their
:class:`DatasetSpec`; :func:`get_spec` looks a name up case-insensitively, aliases included.
"""

from __future__ import annotations

from anomret.data.datasets import adam3d, brain, dagm, isic, kolektor, mvtec, polyp, realiad, visa
from anomret.data.datasets.custom import FOLDER
from anomret.data.datasets.layout import DatasetSpec

# The 16 datasets of the MRAD paper, industrial first, in the order of its tables.
_ORDER = (
    "mvtec", "visa", "btad", "mpdd", "dtd", "sdd", "ksdd2", "dagm",
    "headct", "brainmri", "br35h", "isic", "colondb", "clinicdb", "kvasir", "endo",
)  # fmt: skip
# The further benchmarks of RAD.
_RAD_ONLY = ("realiad", "3dadam")

_ALL = {
    spec.name: spec
    for module in (mvtec, visa, kolektor, dagm, brain, isic, polyp, realiad, adam3d)
    for spec in module.SPECS
}

DATASETS: dict[str, DatasetSpec] = {name: _ALL[name] for name in (*_ORDER, *_RAD_ONLY)}
# Not a benchmark: any folder in MVTec layout, categories named by their folders (your own images).
READERS: dict[str, DatasetSpec] = {**DATASETS, FOLDER.name: FOLDER}

_LOOKUP = {alias.lower(): spec for spec in READERS.values() for alias in (spec.name, *spec.aliases)}


def get_spec(name: str) -> DatasetSpec | None:
    """The spec of a known dataset (case-insensitive, aliases accepted), or ``None``."""
    return _LOOKUP.get(name.strip().lower())


__all__ = ["DATASETS", "FOLDER", "READERS", "DatasetSpec", "get_spec"]
