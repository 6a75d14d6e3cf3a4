"""The encoder contract: a frozen backbone that turns an image batch into ``Features``.

Every method in anomret reads its inputs from ``Features`` and nothing else, so encoders are swapped
by a config override (``encoder=dinov3_vitb16``) without touching retrieval or model code.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class Features:
    """What an encoder hands to the rest of the pipeline.

    Attributes:
        cls: global image feature, ``[B, D_cls]``.
        patches: block index -> patch tokens as a spatial grid ``[B, h, w, C]`` (row-major, extra
            tokens such as CLS and registers already removed).
        projected: block index -> the same grid projected into a joint image-text space
            ``[B, h, w, D_proj]``; empty for encoders without a text tower.
    """

    cls: Tensor
    patches: dict[int, Tensor]
    projected: dict[int, Tensor] = field(default_factory=dict)

    @property
    def grid_size(self) -> tuple[int, int]:
        first = next(iter(self.patches.values()))
        return first.shape[1], first.shape[2]

    def to(self, *args: Any, **kwargs: Any) -> Features:
        return Features(
            cls=self.cls.to(*args, **kwargs),
            patches={k: v.to(*args, **kwargs) for k, v in self.patches.items()},
            projected={k: v.to(*args, **kwargs) for k, v in self.projected.items()},
        )


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for an encoder: squash-resize, centre crop, normalise.

    ``resize`` is the side of the square (aspect-ignoring) resize, ``crop`` the side of the centre
    crop that is fed to the network (``crop == resize`` means no crop).
    """

    resize: int
    crop: int
    mean: tuple[float, ...]  # one value per channel
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")


class Encoder(nn.Module, ABC):
    """A frozen image encoder.

    Subclasses set ``name``, ``image_size``, ``patch_size``, ``cls_dim``, ``patch_dim``, ``layers``
    and ``preprocess`` and implement :meth:`forward`. The weights never train: parameters are frozen
    and :meth:`train` keeps the module in eval mode, so dropout or stochastic depth never leak into
    feature extraction.
    """

    # Whether the encoder can carry a CLIP text tower (its config's ``keep_text`` then says if it does).
    text_tower: ClassVar[bool] = False
    name: str
    image_size: int
    patch_size: int
    cls_dim: int
    patch_dim: int
    layers: tuple[int, ...]
    preprocess: Preprocess

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def _set_input(
        self,
        image_size: int,
        resize: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str,
    ) -> None:
        """Input side and preprocessing: square resize to ``resize`` (default ``image_size``), centre crop."""
        self.image_size = int(image_size)
        self.preprocess = Preprocess(
            resize=int(resize or image_size),
            crop=self.image_size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            interpolation=interpolation,
        )

    def _set_patch_size(self, patch: int | Sequence[int]) -> None:
        self.patch_size = int(patch[0] if isinstance(patch, Sequence) else patch)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}"
            )

    @abstractmethod
    def forward(self, images: Tensor) -> Features:
        """Encode a normalised batch ``[B, 3, image_size, image_size]``."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the weights and feature extraction settings.

        Two encoders with equal fingerprints produce identical features; memory banks store it and
        refuse to be used by an encoder with another one.
        """

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Encoder:
        # Frozen feature extractor: always eval, whatever Lightning asks for.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
