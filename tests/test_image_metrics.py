"""Tests for engine.image_metrics against the lpips package (0.1.4) and scikit-image.

`lpips.L2` is called directly. `lpips.DSSIM` imports `compare_ssim`, which
scikit-image removed, so DSSIM is compared with its replacement
`skimage.metrics.structural_similarity` under the same arguments
(data_range, one SSIM per channel averaged, default 7 x 7 window).
"""

import numpy as np
import pytest

from engine import image_metrics

lpips = pytest.importorskip("lpips")
torch = pytest.importorskip("torch")
structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity


def _images(seed, count=5, size=16):
    """Pairs of [-1, 1] images from 8-bit codes, as a BAPPS PNG loads; pair 0 is identical, pair 1 close."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (2, count, size, size, 3))
    a, b = (codes / 127.5 - 1.0).astype(np.float32)
    b[0] = a[0]
    b[1] = np.clip(a[1] + rng.normal(0.0, 0.03, a[1].shape), -1.0, 1.0)
    b[2] = rng.uniform(-1.0, 1.0, a[2].shape)  # off the 8-bit grid
    return a, b


def _to_torch(image):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("colorspace", ["Lab", "RGB"])
def test_l2_matches_lpips_package(colorspace):
    a, b = _images(0)
    model = lpips.L2(use_gpu=False, colorspace=colorspace)
    expected = np.array([float(model(_to_torch(x), _to_torch(y))) for x, y in zip(a, b)])
    ours = image_metrics.l2_distance(a, b, colorspace=colorspace.lower())
    # Both sides run in float32; 1e-5 relative covers the Lab conversion's rounding.
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9)
    assert ours[0] == 0.0


def _uint8_like_lpips(image):
    return ((image + 1.0) * 127.5).astype(np.uint8)  # lpips.tensor2im truncates


def test_dssim_rgb_matches_skimage():
    a, b = _images(1)
    expected = [(1.0 - structural_similarity(1.0 * _uint8_like_lpips(x), 1.0 * _uint8_like_lpips(y),
                                             data_range=255.0, channel_axis=-1)) / 2.0 for x, y in zip(a, b)]
    ours = image_metrics.dssim(a, b, colorspace="rgb")
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)
    assert ours[0] == pytest.approx(0.0, abs=1e-7)


def test_dssim_lab_matches_skimage():
    a, b = _images(2)
    lab = [[lpips.tensor2np(lpips.tensor2tensorlab(_to_torch(x), to_norm=False)) for x in side] for side in (a, b)]
    expected = [(1.0 - structural_similarity(x, y, data_range=100.0, channel_axis=-1)) / 2.0 for x, y in zip(*lab)]
    np.testing.assert_allclose(image_metrics.dssim(a, b, colorspace="lab"), expected, rtol=0, atol=2e-6)


def test_rgb_to_lab_matches_skimage_on_all_codes():
    color = pytest.importorskip("skimage.color")
    codes = np.stack(np.meshgrid(np.arange(0, 256, 5), np.arange(0, 256, 3), [0, 17, 128, 255]), axis=-1).reshape(-1, 3)
    expected = color.rgb2lab(codes.astype(np.uint8)[None])[0]
    np.testing.assert_allclose(np.asarray(image_metrics.rgb_to_lab(codes)), expected, rtol=0, atol=2e-4)


def test_rejects_bad_images():
    a, b = _images(3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        image_metrics.l2_distance(a * 2.0, b)
    with pytest.raises(ValueError, match="same shape"):
        image_metrics.dssim(a, b[:, :8])
    with pytest.raises(ValueError, match="at least 7"):
        image_metrics.dssim(a[:, :5, :5], b[:, :5, :5])
    with pytest.raises(ValueError, match="unknown colorspace"):
        image_metrics.l2_distance(a, b, colorspace="hsv")
