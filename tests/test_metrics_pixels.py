"""Pixel-level checks: the high-frequency energy ratio sees speckle and blur, the pixel Fréchet distance
is zero for the same set and grows with a shift; both on synthetic images."""

import pytest
import torch

from distillpp.metrics import PixelReference, center_crop, high_frequency_energy, pixel_features, pixel_metrics


def _smooth_images(n: int, seed: int, side: int = 32, pad: int = 2) -> torch.Tensor:
    """Blurred random blobs in [-1, 1] on a constant -1 border (like padded Fashion-MNIST)."""
    g = torch.Generator().manual_seed(seed)
    inner = side - 2 * pad
    x = torch.rand((n, 1, inner // 4, inner // 4), generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    return torch.nn.functional.pad(x, (pad,) * 4, value=-1.0)


def _salt_and_pepper(x: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(x.shape, generator=g) < fraction
    values = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    return torch.where(hit, values, x)


@pytest.fixture(scope="module")
def reference() -> PixelReference:
    return PixelReference.from_images(_smooth_images(1500, 0), crop=28)


def test_laplacian_energy_of_one_bright_pixel_is_its_closed_form():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    # The 3x3 valid Laplacian: 4 at the pixel, -1 at its 4 neighbours, 0 at the 4 corners -> (16 + 4) / 9.
    assert high_frequency_energy(x) == pytest.approx(20 / 9)
    assert high_frequency_energy(torch.full((3, 2, 8, 8), 0.3)) == 0.0


def test_real_vs_real_ratio_is_one_and_pixel_fd_small(reference):
    other = pixel_metrics(_smooth_images(1500, 1), reference)
    assert other["hf_ratio"] == pytest.approx(1.0, abs=0.05)
    shifted = pixel_metrics(_smooth_images(1500, 1) * 0.5 + 0.3, reference)
    assert other["pixel_fd"] < 0.05 * shifted["pixel_fd"]


def test_salt_and_pepper_raises_the_ratio_a_lot_and_blur_lowers_it(reference):
    clean = _smooth_images(1500, 1)
    ratios = [pixel_metrics(_salt_and_pepper(clean, f, 2), reference)["hf_ratio"] for f in (0.0, 0.01, 0.05)]
    assert ratios[0] < 1.1
    assert ratios[1] > 3 * ratios[0]
    assert ratios[2] > 3 * ratios[1]
    blurred = clean.clone()
    blurred[..., 2:30, 2:30] = torch.nn.functional.avg_pool2d(clean[..., 2:30, 2:30], 3, 1, 1, count_include_pad=False)
    assert pixel_metrics(blurred, reference)["hf_ratio"] < 0.5
    noisy = pixel_metrics(_salt_and_pepper(clean, 0.05, 2), reference)["pixel_fd"]
    assert noisy > 2 * pixel_metrics(clean, reference)["pixel_fd"]


def test_identical_sets_have_zero_pixel_fd_and_unit_ratio():
    x = _smooth_images(500, 3)
    m = pixel_metrics(x, PixelReference.from_images(x, crop=28, pool=4))
    assert m["hf_ratio"] == pytest.approx(1.0)
    assert m["pixel_fd"] == pytest.approx(0.0, abs=1e-8)


def test_crop_pool_shapes_and_clamping():
    x = _smooth_images(4, 0)
    assert center_crop(x, 28).shape == (4, 1, 28, 28)
    assert bool((center_crop(x, 28) > -1).any()) and torch.equal(center_crop(x, None), x)
    assert pixel_features(x, 28, 2).shape == (4, 196)
    assert pixel_features(x, None, 1).shape == (4, 1024)
    # Out-of-range and non-finite values are clamped / zeroed like the classifier's inputs.
    y = x.clone()
    y[0, 0, 10, 10] = float("nan")
    y[1] = y[1] * 10
    f = pixel_features(y, None, 1)
    assert torch.isfinite(f).all() and f.abs().max() <= 1


@pytest.mark.parametrize("call, match", [
    (lambda: high_frequency_energy(torch.zeros(4, 32, 32)), r"images must be \[N, C, H, W\]"),
    (lambda: high_frequency_energy(torch.zeros(0, 1, 8, 8)), "images is empty"),
    (lambda: center_crop(torch.zeros(1, 1, 8, 8), 9), "crop must be"),
    (lambda: pixel_features(torch.zeros(2, 1, 8, 8), None, 0), "pool must be"),
    (lambda: high_frequency_energy(torch.zeros(2, 1, 8, 8), crop=2), "at least 3x3"),
    (lambda: PixelReference.from_images(torch.zeros(5, 1, 8, 8)), "no high-frequency energy"),
])
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_reference_of_another_size_is_refused(reference):
    with pytest.raises(ValueError, match="pixel features but the reference"):
        pixel_metrics(torch.zeros(3, 1, 16, 16), PixelReference.from_images(_smooth_images(10, 0, side=20)))
