"""L2 and DSSIM baseline distances with the `lpips` package's conventions, in JAX.

Images are float `[T, H, W, 3]` RGB in [-1, 1], the value range the LPIPS
networks take. The conventions follow `lpips` 0.1.4 (`lpips.L2`,
`lpips.DSSIM`, `lpips.tensor2im`, `lpips.tensor2tensorlab`):

- L2 in RGB: the mean of the squared difference of the [-1, 1] values.
- L2 in Lab: the image is first quantised to uint8 as `tensor2im` does, by
  truncating (x + 1) * 127.5 in float32. It is then converted to CIE L*a*b*
  (D65, 2 degree observer, as `skimage.color.rgb2lab`) and scored as
  0.5 * mean(((lab0 - lab1) / 100)^2).
- DSSIM: (1 - SSIM) / 2, SSIM as `skimage.metrics.structural_similarity`
  with its defaults (7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample
  covariance), averaged over the three channels. In RGB the input is the
  uint8-quantised image with data range 255, in Lab the L*a*b* image with
  data range 100. The `lpips` package's evaluation script defaults to Lab for
  both L2 and DSSIM.

Everything runs in float32, so values match the float64 originals to about
1e-5 relative (the tests state the tolerances).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["COLORSPACES", "dssim", "l2_distance", "quantize_like_lpips", "rgb_to_lab"]

COLORSPACES = ("lab", "rgb")

# sRGB (linear) to XYZ and the D65 white point of a 2 degree observer, as in scikit-image 0.26.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def _linear_srgb_table() -> np.ndarray:
    """Return float64 `[256]` linear-light values of the 8-bit sRGB codes."""
    value = np.arange(256) / 255.0
    return np.where(value > 0.04045, ((value + 0.055) / 1.055) ** 2.4, value / 12.92)


_LINEAR_SRGB = _linear_srgb_table()

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_images(a: Any, b: Any) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a, dtype=jnp.float32)
    b = jnp.asarray(b, dtype=jnp.float32)
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape != b.shape:
        raise ValueError(f"images must both be [T, H, W, 3] RGB with the same shape, got {a.shape} and {b.shape}.")
    for name, image in (("a", a), ("b", b)):
        low, high = float(jnp.min(image)), float(jnp.max(image))
        if not (-1.0 <= low and high <= 1.0):
            raise ValueError(f"image {name} has values in [{low}, {high}]; expected [-1, 1] "
                             "(map 8-bit images with x / 127.5 - 1).")
    return a, b


def _check_colorspace(colorspace: str) -> str:
    key = colorspace.lower()
    if key not in COLORSPACES:
        raise ValueError(f"unknown colorspace {colorspace!r}; valid colorspaces: {list(COLORSPACES)}.")
    return key


def quantize_like_lpips(images: jax.Array) -> jax.Array:
    """Return int32 `[T, H, W, 3]` 8-bit codes, truncating (x + 1) * 127.5 as `lpips.tensor2im` does."""
    return ((images + 1.0) * 127.5).astype(jnp.int32)


def rgb_to_lab(codes: jax.Array) -> jax.Array:
    """Convert 8-bit sRGB codes `[..., 3]` to float32 CIE L*a*b* `[..., 3]` (D65, 2 degree observer)."""
    linear = jnp.asarray(_LINEAR_SRGB, dtype=jnp.float32)[codes]
    matrix = jnp.asarray(_XYZ_FROM_RGB / _D65_WHITE[:, None], dtype=jnp.float32)
    xyz = jnp.einsum("...c,dc->...d", linear, matrix, precision=jax.lax.Precision.HIGHEST)
    f = jnp.where(xyz > 0.008856, jnp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return jnp.stack([lightness, a, b], axis=-1)


def _lab_pair(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    # One materialised conversion for both sides, so identical images get
    # bit-identical Lab values: XLA on CPU otherwise fuses each side into its
    # consumer, and the two fused copies can round differently.
    lab = jax.lax.optimization_barrier(rgb_to_lab(quantize_like_lpips(jnp.concatenate([a, b], axis=0))))
    return lab[:a.shape[0]], lab[a.shape[0]:]


@functools.partial(jax.jit, static_argnames=("colorspace",))
def _l2(a: jax.Array, b: jax.Array, colorspace: str) -> jax.Array:
    if colorspace == "rgb":
        return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    lab_a, lab_b = _lab_pair(a, b)
    # Subtract before scaling: XLA may contract lab_a / 100 - lab_b / 100 into a
    # fused multiply-add, which is not exactly zero for identical images.
    return 0.5 * jnp.mean(jnp.square((lab_a - lab_b) / 100.0), axis=(1, 2, 3))


def l2_distance(a: Any, b: Any, *, colorspace: str = "lab") -> np.ndarray:
    """Return float32 `[T]` L2 distances between image pairs, as `lpips.L2`.

    Args:
      a: `[T, H, W, 3]` RGB images in [-1, 1].
      b: `[T, H, W, 3]` RGB images in [-1, 1].
      colorspace: "lab" (the `lpips` default) or "rgb".
    """
    colorspace = _check_colorspace(colorspace)
    a, b = _check_images(a, b)
    return np.asarray(_l2(a, b, colorspace))


def _box_mean(images: jax.Array) -> jax.Array:
    """Return the mean over every valid 7 x 7 window: `[T, H - 6, W - 6, 3]`."""
    window = (1, SSIM_WINDOW, SSIM_WINDOW, 1)
    total = jax.lax.reduce_window(images, 0.0, jax.lax.add, window, (1, 1, 1, 1), "VALID")
    return total / float(SSIM_WINDOW * SSIM_WINDOW)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _ssim(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    # Centre on a per-image, per-channel constant: the variances and covariance
    # do not change, and float32 keeps their precision (255^2 would lose it).
    centre = 0.5 * (jnp.mean(x, axis=(1, 2), keepdims=True) + jnp.mean(y, axis=(1, 2), keepdims=True))
    x = x - centre
    y = y - centre

    mean_x = _box_mean(x)
    mean_y = _box_mean(y)
    sample = SSIM_WINDOW * SSIM_WINDOW / (SSIM_WINDOW * SSIM_WINDOW - 1.0)
    var_x = sample * (_box_mean(x * x) - mean_x * mean_x)
    var_y = sample * (_box_mean(y * y) - mean_y * mean_y)
    cov = sample * (_box_mean(x * y) - mean_x * mean_y)

    mean_x = mean_x + centre
    mean_y = mean_y + centre
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2.0 * mean_x * mean_y + c1) * (2.0 * cov + c2)) / (
        (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def dssim(a: Any, b: Any, *, colorspace: str = "rgb") -> np.ndarray:
    """Return float32 `[T]` DSSIM = (1 - SSIM) / 2 between image pairs, as `lpips.DSSIM`.

    Args:
      a: `[T, H, W, 3]` RGB images in [-1, 1], H and W at least 7.
      b: `[T, H, W, 3]` RGB images in [-1, 1].
      colorspace: "rgb" (8-bit codes, data range 255) or "lab" (L*a*b*, data
        range 100; the `lpips` evaluation script's default).
    """
    colorspace = _check_colorspace(colorspace)
    a, b = _check_images(a, b)
    if min(a.shape[1], a.shape[2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW}, got {a.shape[1:3]}.")

    if colorspace == "rgb":
        x = quantize_like_lpips(a).astype(jnp.float32)
        y = quantize_like_lpips(b).astype(jnp.float32)
        data_range = 255.0
    else:
        x, y = jax.jit(_lab_pair)(a, b)
        data_range = 100.0
    return np.asarray((1.0 - _ssim(x, y, data_range)) / 2.0)
