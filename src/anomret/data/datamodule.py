"""The LightningDataModule: two sources per run, one for memory/training, one for evaluation.

- ``aux_dataset`` feeds the fit pass: the labelled auxiliary data of MRAD (another dataset's test
  split) or the normal training images of RAD.
- ``dataset`` is what the run is evaluated on, category by category.

A source is a plain mapping (a Hydra ``dataset/`` or ``aux_dataset/`` config):
``{name, root, split, categories, require_masks, synthetic}``. ``synthetic: true`` generates the
built-in synthetic domain ``name`` under ``root``'s parent on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from torch.utils.data import DataLoader

from anomret.checks import integer_at_least, number_in
from anomret.data.batch import collate_items
from anomret.data.dataset import AnomalyDataset, FeatureSource
from anomret.data.samples import ANOMALOUS, SampleTable
from anomret.data.sources import load_source
from anomret.encoders.base import Preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """Where a run reads one of its two sources from."""

    name: str
    root: str
    split: str = "test"
    categories: tuple[str, ...] | None = None
    require_masks: bool | None = None
    synthetic: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SourceSpec:
        known = {"name", "root", "split", "categories", "require_masks", "synthetic"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in dataset config (known: {sorted(known)})")
        values = dict(config)
        if values.get("categories") is not None:
            categories = values["categories"]
            values["categories"] = (categories,) if isinstance(categories, str) else tuple(categories)
        return cls(**values)

    def load(self, evaluated: bool = False) -> SampleTable:
        """The samples; ``evaluated``: the run scores them, so a split without anomalous images (whose
        metrics are undefined) is named before any compute."""
        return load_source(
            self.name,
            self.root,
            split=self.split,
            categories=None if self.categories is None else list(self.categories),
            require_masks=self.require_masks,
            evaluated=evaluated,
        )

    def describe(self, samples: SampleTable) -> str:
        anomalous = samples.count(ANOMALOUS)
        return (
            f"{self.name} [{self.split}] {len(samples)} images ({len(samples) - anomalous} normal, "
            f"{anomalous} anomalous) in {len(samples.categories)} categories"
        )


def check_loader_settings(
    batch_size: Any, eval_batch_size: Any, num_workers: Any, mask_size: Any = None, mask_threshold: Any = 0.5
) -> dict[str, Any]:
    """The ``data=`` settings the loaders use, range-checked (shared with the predict entry point)."""
    batch_size = integer_at_least(batch_size, "data.batch_size", 1)
    return {
        "batch_size": batch_size,
        "eval_batch_size": integer_at_least(
            eval_batch_size, "data.eval_batch_size", 1, none="the batch size of the fit pass"
        )
        or batch_size,
        "num_workers": integer_at_least(num_workers, "data.num_workers", 0),
        "mask_size": integer_at_least(mask_size, "data.mask_size", 1, none="the encoder's crop size"),
        "mask_threshold": number_in(mask_threshold, "data.mask_threshold", 0.0, 1.0, high_open=True),
    }


class AnomalyDataModule(LightningDataModule):
    """Loads the auxiliary (fit) and evaluation (test) sources with the encoder's preprocessing.

    Args:
        dataset: evaluation source config.
        aux_dataset: memory/training source config (``None`` for runs that only evaluate).
        preprocess: the encoder's resize/crop/normalisation.
        mask_size: side of the ground-truth masks, equal to the anomaly-map size evaluated on.
        mask_threshold: masks are binarised with ``> mask_threshold`` after resizing.
        batch_size: batch size of the fit pass.
        eval_batch_size: batch size of the test pass (defaults to ``batch_size``).
        num_workers: DataLoader workers.
        shuffle_aux: shuffle the fit pass (training heads); memory building does not need it.
        feature_store: where encoder outputs are cached (set by the run when ``features.enabled``).
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        preprocess: Preprocess,
        aux_dataset: Mapping[str, Any] | None = None,
        mask_size: int | None = None,
        mask_threshold: float = 0.5,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle_aux: bool = False,
        feature_store: FeatureSource | None = None,
    ) -> None:
        super().__init__()
        settings = check_loader_settings(batch_size, eval_batch_size, num_workers, mask_size, mask_threshold)
        self.dataset_spec = SourceSpec.from_config(dataset)
        self.aux_spec = None if aux_dataset is None else SourceSpec.from_config(aux_dataset)
        self.preprocess = preprocess
        self.mask_size = settings["mask_size"]
        self.mask_threshold = settings["mask_threshold"]
        self.batch_size = settings["batch_size"]
        self.eval_batch_size = settings["eval_batch_size"]
        self.num_workers = settings["num_workers"]
        self.pin_memory = pin_memory
        self.shuffle_aux = shuffle_aux
        self.feature_store = feature_store
        self.aux_samples: SampleTable | None = None
        self.test_samples: SampleTable | None = None

    def prepare_data(self) -> None:
        for spec in (self.dataset_spec, self.aux_spec):
            if spec is not None and spec.synthetic:
                from anomret.data.synthetic import ensure_synthetic

                ensure_synthetic(Path(spec.root).parent, domains=(spec.name,))

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.aux_samples is None:
            if self.aux_spec is None:
                raise ValueError(
                    "this run needs an aux_dataset (memory/training source); set aux_dataset=NAME"
                )
            self.aux_samples = self.aux_spec.load()
            log.info("memory/training source: %s", self.aux_spec.describe(self.aux_samples))
        if stage in ("test", "predict", None) and self.test_samples is None:
            self.test_samples = self.dataset_spec.load(evaluated=True)
            log.info("evaluation source: %s", self.dataset_spec.describe(self.test_samples))

    def _dataset(self, samples: SampleTable) -> AnomalyDataset:
        return AnomalyDataset(
            samples, self.preprocess, self.mask_size, self.mask_threshold, feature_store=self.feature_store
        )

    def _loader(self, samples: SampleTable, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(samples),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            collate_fn=collate_items,
        )

    def aux_dataloader(self) -> DataLoader:
        """The auxiliary source in row order, for the memory pass."""
        if self.aux_samples is None:
            self.setup("fit")
        assert self.aux_samples is not None  # setup("fit") loads them (or raises)
        return self._loader(self.aux_samples, self.batch_size, shuffle=False)

    def memory_dataloader(self, samples: SampleTable) -> DataLoader:
        """Some images of the memory source (a few-shot draw, the images a bank lacks), in order."""
        return self._loader(samples, self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        if self.aux_samples is None:
            self.setup("fit")
        assert self.aux_samples is not None  # setup("fit") loads them (or raises)
        return self._loader(self.aux_samples, self.batch_size, self.shuffle_aux)

    def test_dataloader(self) -> DataLoader:
        if self.test_samples is None:
            self.setup("test")
        assert self.test_samples is not None  # setup("test") loads them
        # Category order is kept: the evaluator and the overlays group consecutive images.
        return self._loader(self.test_samples, self.eval_batch_size, shuffle=False)
