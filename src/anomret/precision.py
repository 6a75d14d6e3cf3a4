"""The run's precision policy (``precision=exact|tf32|fast``): one choice, applied in one place.

=========  ===========================  =====================================  =============================
policy     encoder (``encoder.precision``)  other float32 matmuls of the process  use
=========  ===========================  =====================================  =============================
``exact``  fp32, IEEE matmuls           IEEE (``highest``)                     the official code's numbers
``tf32``   fp32, TF32 matmuls           TF32 (``high``)                        ~2× the encoder on Ampere+
``fast``   bf16 autocast                TF32 (``high``)                        ~5× the encoder on Ampere+
=========  ===========================  =====================================  =============================

Whatever the policy, retrieval runs in IEEE float32 (:func:`~anomret.retrieval.spatial.exact_matmul`),
maps in float32 and metrics in float64; the policy only changes the encoder's arithmetic and the float32
matmuls outside it (MRAD-FT/CLIP's trained heads and text tower). The encoder's precision is part of its
fingerprint, so banks and stored features of two policies never mix. The assembly applies the policy
(:meth:`PrecisionPolicy.apply`, which also settles Lightning's TF32 hint) and ``results.json`` records it
(``settings.precision``). ``experiments/benchmarks/gpu.md`` records what ``fast`` changes in the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from anomret.encoders.postprocess import PRECISIONS

MATMUL_PRECISIONS = ("highest", "high", "medium")
# Lightning's advice to set the float32 matmul precision, given whenever it is "highest": the policy has
# chosen it (exact keeps IEEE float32 on purpose), so the advice is dropped, verbose or not.
_TF32_HINT = "You are using a CUDA device"
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _SettledHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TF32_HINT)


_SETTLED = _SettledHint()


@dataclass(frozen=True)
class PrecisionPolicy:
    """Hydra ``precision=`` group (its values under ``precision_policy``: ``precision_policy.matmul=high``).

    Args:
        name: the policy's name, recorded with the run.
        encoder: the encoder's arithmetic (``fp32``, ``tf32``, ``bf16``, ``fp16``); the encoder configs
            read it (``encoder.precision: ${precision_policy.encoder}``), so ``encoder.precision=...`` wins.
        matmul: ``torch.set_float32_matmul_precision`` for the rest of the process: ``highest`` (IEEE
            float32) or ``high`` (TF32 on GPUs that have it); retrieval is IEEE float32 either way.
    """

    name: str = "exact"
    encoder: str = "fp32"
    matmul: str = "highest"

    def __post_init__(self) -> None:
        if self.encoder not in PRECISIONS:
            raise ValueError(f"precision_policy.encoder must be one of {PRECISIONS}, got {self.encoder!r}")
        if self.matmul not in MATMUL_PRECISIONS:
            raise ValueError(
                f"precision_policy.matmul must be one of {MATMUL_PRECISIONS}, got {self.matmul!r}"
            )

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> PrecisionPolicy:
        """The policy of a config's ``precision_policy`` node (``None``: ``exact``)."""
        if not node:
            return cls()
        known = {"name", "encoder", "matmul"}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"unknown precision_policy settings {unknown} (known: {sorted(known)})")
        return cls(**{key: str(value) for key, value in node.items()})

    def apply(self) -> None:
        """Set the process's float32 matmul precision; Lightning's hint about it is settled."""
        torch.set_float32_matmul_precision(self.matmul)
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            if _SETTLED not in logger.filters:
                logger.addFilter(_SETTLED)

    def record(self, encoder_precision: str) -> dict[str, str]:
        """What results.json keeps: the policy and what the run actually used."""
        return {
            "policy": self.name,
            "encoder": encoder_precision,
            "float32_matmul": self.matmul,
            "retrieval": "fp32 (IEEE)",
        }
