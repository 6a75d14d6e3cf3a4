import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomret.maps import AnomalyMapper, gaussian_blur, top_k_mean, upsample


@pytest.mark.parametrize("sigma", [1.0, 4.0])
@pytest.mark.parametrize("shape", [(40, 52), (9, 7)])
def test_blur_matches_scipy_reflect(sigma, shape):
    # (9, 7) with sigma 4 has a radius of 16 > map size: exercises repeated mirroring.
    rng = np.random.default_rng(0)
    maps = rng.random((2, *shape))
    expected = np.stack([gaussian_filter(m, sigma=sigma, truncate=4.0, mode="reflect") for m in maps])
    got = gaussian_blur(torch.from_numpy(maps), sigma)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_blur_5x5_zero_padding_matches_scipy_constant():
    rng = np.random.default_rng(1)
    maps = rng.random((1, 30, 30))
    # scipy radius 2 for sigma=1 comes from truncate=2; mode constant = zero padding.
    expected = gaussian_filter(maps[0], sigma=1.0, truncate=2.0, mode="constant", cval=0.0)
    got = gaussian_blur(torch.from_numpy(maps), 1.0, kernel_size=5, padding="zeros")[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_blur_preserves_constant_maps_and_zero_sigma_is_identity():
    maps = torch.full((1, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(maps, 4.0), maps)
    random = torch.rand(1, 8, 8)
    assert gaussian_blur(random, 0) is random


def test_upsample_bilinear_half_pixel_centres():
    patch = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    up = upsample(patch, 4)
    # align_corners=False samples x = -0.25, 0.25, 0.75, 1.25 in input pixels; the ends clamp to the edges.
    torch.testing.assert_close(up[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_top_k_mean_hand_worked():
    maps = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    assert top_k_mean(maps, 0.03).item() == pytest.approx((99 + 98 + 97) / 3)
    assert top_k_mean(maps, 0.0).item() == 99  # k floors to 1: the max
    with pytest.raises(ValueError):
        top_k_mean(maps, 1.5)


def test_mapper_shapes():
    mapper = AnomalyMapper(size=518, sigma=4)
    out = mapper(torch.rand(2, 37, 37))
    assert out.shape == (2, 518, 518)
