"""What a method needs from the rest of a run (:class:`MethodNeeds`), declared on each method class.

A plain dataclass, imported by the methods and by :mod:`anomret.contracts`, which reads a config's method
class from its source and compares its needs with the composed groups before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodNeeds:
    """What a method needs from the rest of a run; checked against the config before anything is built.

    Attributes:
        memory: the memory kind it reads (``memory=`` group: ``labeled``, ``normal``).
        retrieval: the retrieval kind it calls (``retrieval=`` group: ``softmax``, ``spatial``).
        trains: it has trained parts (heads, prompts), so evaluating it needs a checkpoint.
        aux_masks: its memory (and training) read the auxiliary images' pixel masks.
        text_tower: it runs the encoder's CLIP text tower.
        unused_parameters: it trains different parameters in different epochs (DDP must look for unused ones).
    """

    memory: str
    retrieval: str
    trains: bool = False
    aux_masks: bool = False
    text_tower: bool = False
    unused_parameters: bool = False
