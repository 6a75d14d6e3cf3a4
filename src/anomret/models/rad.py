"""RAD: training-free multi-class anomaly detection by retrieval from a memory of normal images.

Per test image (the RAD paper, Sec. 3; the official code's constants):

1. global context retrieval: the K memory images whose final CLS is most cosine-similar;
2. per layer, each test patch's score is 1 − its largest cosine with the patches of those K images
   inside the L∞ window of radius ρ around its position (the window clipped at the border);
3. the layer maps are averaged with weights (equal by default), upsampled bilinearly to ``model.map.size``
   (256) and blurred with the 5×5 σ = 1 zero-padded Gaussian (the method base's mapper);
4. the image score is the mean of the top 1 % of the map.

Native-resolution maps: ``model.map.size=${encoder.image_size}`` (the masks follow ``model.map.size``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from anomret.encoders.base import Encoder, Features
from anomret.maps import AnomalyMapper, ImageScorer
from anomret.memory.base import MemoryBank
from anomret.memory.normal_bank import NormalMemoryBank
from anomret.metrics.evaluator import CategoryEvaluator
from anomret.models.base import MethodOutput, RetrievalModule
from anomret.needs import MethodNeeds
from anomret.retrieval.spatial import SpatialRetrieval, layer_weights


class RAD(RetrievalModule):
    """RAD on the method base: the normal-image bank is built by the memory pass, nothing trains.

    Args:
        encoder, map, score, evaluator: see :class:`~anomret.models.base.RetrievalModule` (RAD's
            ``model.map``: 256 px, σ 1, 5×5, zero padding; ``model.score``: the top 1 % mean).
        retrieval: global top-K + windowed 1-NN (``retrieval=spatial``: ``k``, ``rho``).
        layers: the memory layers scored (``None``: all of the bank's; ``[12]``: the one-layer ablation).
        layer_weights: fusion weights, a list in ``layers`` order or a mapping layer → weight,
            renormalised to sum to 1 (``None``: equal, as the paper).
    """

    method = "rad"
    needs = MethodNeeds(memory="normal", retrieval="spatial")

    def __init__(
        self,
        encoder: Encoder,
        retrieval: SpatialRetrieval,
        map: AnomalyMapper,
        score: ImageScorer | None = None,
        evaluator: CategoryEvaluator | None = None,
        layers: Sequence[int] | None = None,
        layer_weights: Sequence[float] | Mapping[int, float] | None = None,
    ) -> None:
        super().__init__(encoder, map, score, evaluator)
        self.save_hyperparameters(ignore=list(self.built_arguments), logger=False)
        self.retriever = retrieval
        self.layers = None if layers is None else [int(layer) for layer in layers]
        if isinstance(layer_weights, Mapping):
            layer_weights = {int(layer): float(weight) for layer, weight in layer_weights.items()}
        self.layer_weights = layer_weights
        self.k_used: int | None = None

    def memory_dims(self, bank: MemoryBank) -> dict[str, int]:
        assert isinstance(bank, NormalMemoryBank)  # attach_memory checked its kind
        return {
            "cls": self.encoder.cls_dim,
            **{f"patch.{layer}": self.encoder.patch_dim for layer in bank.layers},
        }

    def scored_layers(self, bank: NormalMemoryBank) -> list[int]:
        layers = bank.layers if self.layers is None else self.layers
        missing = [layer for layer in layers if layer not in bank.layers]
        if missing or not layers:
            raise ValueError(
                f"model.layers={self.layers} must be a non-empty subset of the memory's layers {bank.layers}. "
                "Fix: model.layers=null (all), or build the memory with those encoder layers."
            )
        extracted = [layer for layer in layers if layer not in self.encoder.layers]
        if extracted:
            raise ValueError(
                f"the memory holds layers {extracted} that this encoder does not extract ({list(self.encoder.layers)})"
            )
        return list(layers)

    def check_memory_size(self, n_images: int) -> None:
        """Refuse a K larger than the memory before the memory pass runs (unless ``retrieval.cap_k``)."""
        self.retriever.k_for(n_images)

    def on_memory_attached(self) -> None:
        bank = self.bank
        assert isinstance(bank, NormalMemoryBank)
        layers = self.scored_layers(bank)
        layer_weights(layers, self.layer_weights)  # validates count and values now, not mid-test
        self.k_used = self.retriever.k_for(bank.n_images)

    def retrieval_settings(self) -> dict[str, Any]:
        """What the run used, recorded in results.json (K can be capped at the memory size)."""
        bank = self.bank
        assert isinstance(bank, NormalMemoryBank)
        return {
            "k": self.retriever.k,
            "k_used": self.k_used,
            "rho": self.retriever.rho,
            "layers": self.scored_layers(bank),
            "layer_weights": layer_weights(self.scored_layers(bank), self.layer_weights),
            "memory_images": bank.n_images,
            "memory_dtype": bank.storage_dtype,
            "memory_placement": None if bank.placed is None else bank.placed.mode,
        }

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.test_results is not None:
            self.test_results.settings["retrieval"] = self.retrieval_settings()

    def _bank_to_device(self) -> None:
        if self.bank is None:
            raise RuntimeError(f"{self.method}: no memory bank attached (the run builds or loads one first)")
        bank = self.bank
        assert isinstance(bank, NormalMemoryBank)
        # Only the scored layers' rows are placed (model.layers may score a subset of the bank's).
        self.bank = bank.to(self.device, self.scored_layers(bank))

    def score(self, features: Features) -> MethodOutput:
        bank = self.bank
        assert isinstance(bank, NormalMemoryBank)
        layers = self.scored_layers(bank)
        device = features.cls.device
        if bank.placed is None or not bank.placed.serves(device, layers):  # scored outside a Trainer loop
            bank = self.bank = bank.to(device, layers)
        assert bank.placed is not None
        neighbors = self.retriever.neighbors(features.cls, bank.cls)
        # The memory decides where the rows are read from: the whole batch at once, or groups of images
        # whose neighbours' rows fit its budget (scores of an image never depend on its batch-mates).
        parts = [
            self.retriever.scores(
                {layer: features.patches[layer][group.queries] for layer in layers},
                group.banks,
                group.neighbors,
                weights=self.layer_weights,
            )
            for group in bank.placed.groups(neighbors, layers)
        ]
        return MethodOutput(patch_scores=parts[0] if len(parts) == 1 else torch.cat(parts))
