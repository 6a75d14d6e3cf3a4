"""Small, honest checkpoints: a method's trained state plus what it is only valid with.

A checkpoint written by anomret holds the trainable parameters of a method (never the frozen encoder),
and under the ``anomret`` key the method name, the encoder fingerprint and the memory bank's identity.
:func:`restore` refuses a checkpoint whose method, encoder or bank differs from the run's, saying what
differs. Files are read with ``weights_only=True``: nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anomret.models.base import CHECKPOINT_KEY, RetrievalModule


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely; its ``anomret`` identity is returned as the top level."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Fix: pass ckpt_path= the checkpoints/last.ckpt of a train run "
            "(its path is in that run's artifacts.json)."
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(raw, dict) or CHECKPOINT_KEY not in raw or "state_dict" not in raw:
        raise CheckpointError(
            f"{path} is not an anomret checkpoint (no '{CHECKPOINT_KEY}' identity). Official MRAD checkpoints "
            "are loaded with model.official_checkpoint=PATH instead."
        )
    return {**raw[CHECKPOINT_KEY], "state_dict": raw["state_dict"]}


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))


def restore(model: RetrievalModule, checkpoint: dict[str, Any], path: str | Path | None = None) -> None:
    """Load ``checkpoint``'s trained state into ``model`` after checking method, encoder and bank."""
    where = f"checkpoint {path}" if path else "the checkpoint"
    current = model.identity()
    if checkpoint.get("method") != current["method"]:
        raise CheckpointError(
            f"{where} was trained for {checkpoint.get('method')}, but this run's model is {current['method']}. "
            f"Fix: evaluate it with method={checkpoint.get('method')} (or the experiment it was trained with)."
        )
    stored_encoder, encoder = checkpoint.get("encoder") or {}, current["encoder"]
    if stored_encoder != encoder:
        raise CheckpointError(
            f"{where} was trained on encoder {stored_encoder.get('name', '?')} but this run uses "
            f"{encoder.get('name', '?')} (they differ in: {', '.join(_differences(stored_encoder, encoder))}). "
            "Fix: use the encoder settings it was trained with."
        )
    stored_bank, bank = checkpoint.get("bank") or {}, current["bank"] or {}
    if stored_bank.get("identity") != bank.get("identity"):
        raise CheckpointError(
            f"{where} was trained with memory bank {stored_bank.get('path')} (identity "
            f"{str(stored_bank.get('identity'))[:12]}), but this run uses {bank.get('path')} (identity "
            f"{str(bank.get('identity'))[:12]}): the heads were trained against another memory. Fix: pass "
            f"memory.path={stored_bank.get('path')} or leave memory.path unset."
        )
    model.load_state_dict(checkpoint["state_dict"])
