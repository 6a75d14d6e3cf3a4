"""The memory pass: an inference loop over the memory source that feeds a bank builder.

It runs under the run's Lightning Trainer (``trainer.predict``), so it gets the same devices, precision,
progress bar and DDP processes as the test pass. Under DDP each process encodes its share of the images
exactly once (Lightning's prediction sampler does not repeat samples); the builders' partial states are
then gathered and merged in dataset order, so every process ends with the bank a single process builds.
A builder may keep its large rows on disk (RAD's): its state then says where they are, and only that
and the small per-image tensors are gathered.
"""

from __future__ import annotations

from lightning import LightningModule

from anomret.data.batch import Batch
from anomret.distributed import all_gather
from anomret.features.extractor import FeatureExtractor
from anomret.memory.base import BankBuilder


class MemoryPass(LightningModule):
    """``trainer.predict(MemoryPass(extractor, builder), dataloaders=...)`` fills ``builder``."""

    def __init__(self, extractor: FeatureExtractor, builder: BankBuilder) -> None:
        super().__init__()
        self.encoder = extractor.encoder  # registered, so the Trainer moves it to the device
        self.extractor = extractor
        self.builder = builder

    def predict_step(self, batch: Batch, batch_idx: int) -> None:
        self.builder.add(self.extractor(batch), batch)

    def on_predict_epoch_end(self) -> None:
        self.builder.load_states(all_gather(self.builder.state()))
