"""From patch scores to anomaly maps and image scores: upsample, blur, top-k mean.

Pure tensor functions (batched, device-agnostic). The blur reproduces
``scipy.ndimage.gaussian_filter`` (MRAD: σ=4, truncate 4, 'reflect' borders) and, with
``kernel_size=5, padding='zeros'``, the 5×5 σ=1 zero-padded blur of the RAD code.

Every method's maps and image scores go through the two settings objects here, configured once in the
``model=`` group (``model.map.*`` and ``model.score.*``): :class:`AnomalyMapper` and :class:`ImageScorer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from anomret.checks import integer_at_least, number_in


def upsample(scores: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[B, h, w]`` maps to ``size`` (align_corners=False, no antialias)."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def gaussian_kernel1d(sigma: float, radius: int, dtype: torch.dtype = torch.float32) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _symmetric_indices(length: int, radius: int, device: torch.device) -> Tensor:
    # scipy's 'reflect' mode mirrors about the pixel edge (d c b a | a b c d | d c b a), repeated with
    # period 2·length, so it works even when the kernel is wider than the map.
    positions = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)


def _blur_last_dim(maps: Tensor, kernel: Tensor, padding: str) -> Tensor:
    radius = (kernel.numel() - 1) // 2
    length = maps.shape[-1]
    if padding == "reflect":
        padded = maps.index_select(-1, _symmetric_indices(length, radius, maps.device))
    elif padding == "zeros":
        padded = F.pad(maps, (radius, radius))
    else:
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    flat = padded.reshape(-1, 1, padded.shape[-1])
    return F.conv1d(flat, kernel.view(1, 1, -1)).reshape(maps.shape)


def gaussian_blur(
    maps: Tensor,
    sigma: float,
    *,
    truncate: float = 4.0,
    kernel_size: int | None = None,
    padding: str = "reflect",
) -> Tensor:
    """Separable Gaussian blur of ``[..., H, W]`` maps.

    Args:
        maps: anomaly maps.
        sigma: standard deviation in pixels; ``0`` returns the maps unchanged.
        truncate: radius in sigmas, as scipy (radius = int(truncate·σ + 0.5)).
        kernel_size: explicit odd kernel size, overriding ``truncate``.
        padding: ``'reflect'`` (scipy's default) or ``'zeros'``.
    """
    if sigma <= 0:
        return maps
    if kernel_size is not None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        radius = kernel_size // 2
    else:
        radius = int(truncate * sigma + 0.5)
    kernel = gaussian_kernel1d(sigma, radius, maps.dtype).to(maps.device)
    blurred = _blur_last_dim(maps, kernel, padding)
    return _blur_last_dim(blurred.transpose(-1, -2), kernel, padding).transpose(-1, -2)


def top_k_mean(maps: Tensor, ratio: float) -> Tensor:
    """Mean of the ``int(ratio·H·W)`` largest values of each ``[B, H, W]`` map (the max if that is 0)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(ratio * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


@dataclass
class AnomalyMapper:
    """Patch scores ``[B, h, w]`` → anomaly maps ``[B, size, size]``: bilinear upsample, then blur.

    ``model.map``: ``size`` (side of the maps; the ground-truth masks follow it), ``sigma`` (Gaussian σ in
    pixels, 0 = no blur), ``kernel_size`` (explicit odd size, RAD: 5; ``None``: scipy's truncate rule),
    ``padding`` (``reflect`` as scipy, MRAD; ``zeros``, RAD).
    """

    size: int
    sigma: float = 4.0
    truncate: float = 4.0
    kernel_size: int | None = None
    padding: str = "reflect"

    def __post_init__(self) -> None:
        integer_at_least(self.size, "model.map.size", 1)
        number_in(self.sigma, "model.map.sigma", 0.0)
        number_in(self.truncate, "model.map.truncate", 0.0, low_open=True)
        kernel = integer_at_least(self.kernel_size, "model.map.kernel_size", 1, none="scipy's truncate rule")
        if kernel is not None and kernel % 2 == 0:
            raise ValueError(f"model.map.kernel_size must be odd, got {kernel}")
        if self.padding not in ("reflect", "zeros"):
            raise ValueError(f"model.map.padding must be 'reflect' or 'zeros', got {self.padding!r}")

    def __call__(self, patch_scores: Tensor) -> Tensor:
        maps = upsample(patch_scores.float(), self.size)
        return gaussian_blur(
            maps, self.sigma, truncate=self.truncate, kernel_size=self.kernel_size, padding=self.padding
        )


@dataclass
class ImageScorer:
    """An image's score from its anomaly map and, for methods that retrieve at image level, that retrieval.

    ``model.score``: ``top_k_ratio`` (share of map pixels averaged, 1 %) and ``retrieval_weight`` (``w``
    in ``w · retrieval + (1 − w) · TopKMean(map)``; the MRAD code's 0.7, 0.5 ranks like the paper's sum).
    Methods without an image-level retrieval (RAD) score by the top-k mean alone.
    """

    top_k_ratio: float = 0.01
    retrieval_weight: float = 0.7

    def __post_init__(self) -> None:
        number_in(self.top_k_ratio, "model.score.top_k_ratio", 0.0, 1.0, low_open=True)
        number_in(self.retrieval_weight, "model.score.retrieval_weight", 0.0, 1.0)

    def __call__(self, anomaly_map: Tensor, retrieval: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(image score [B], map score [B])`` of ``[B, H, W]`` maps and an optional ``[B]`` retrieval."""
        map_score = top_k_mean(anomaly_map, self.top_k_ratio)
        if retrieval is None:
            return map_score, map_score
        weight = self.retrieval_weight
        return weight * retrieval + (1 - weight) * map_score, map_score
