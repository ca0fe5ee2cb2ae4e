"""Classical descriptors from scikit-image: colour, gradients, edges, texture, layout.

They need no weights, so they work on every machine. Each descriptor is
computed in `preprocess`, which DataLoader workers run in parallel; `embed`
only stacks the vectors of a batch.

No descriptor yields an all-zero row, which would leave the cosine similarity
undefined: histograms sum to one, and the HOG and thumbnail vectors, which
are zero for a flat or black image, end with one constant component
`BIAS = 1e-3`. That component makes all flat images equal to each other and
almost orthogonal to textured ones, and changes the cosine between two
textured images by less than 1e-6 (their HOG norm is at least about 1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from extractors.preprocess import resize_and_crop
from extractors.registry import BuildOptions, InputSpec, Representation, register

BIAS = 1e-3


def _on_gray(descriptor: Callable[..., np.ndarray], rgb: np.ndarray, **kwargs: Any) -> np.ndarray:
    from skimage.color import rgb2gray

    return descriptor(rgb2gray(rgb), **kwargs)


def color_histogram(rgb: np.ndarray, *, bins: int) -> np.ndarray:
    """Return the joint RGB histogram [bins**3], normalised to sum 1, square-rooted.

    With the square root, the cosine of two histograms is their Bhattacharyya
    coefficient.
    """
    quantised = np.minimum((rgb.astype(np.float64) * bins).astype(np.int64), bins - 1)
    index = (quantised[..., 0] * bins + quantised[..., 1]) * bins + quantised[..., 2]
    counts = np.bincount(index.ravel(), minlength=bins ** 3).astype(np.float64)
    return np.sqrt(counts / counts.sum())


def hog_descriptor(gray: np.ndarray, *, cell: int) -> np.ndarray:
    """Return scikit-image's HOG (9 orientations, 2x2-cell blocks, L2-Hys) with the bias component."""
    from skimage.feature import hog

    features = hog(gray, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2),
                   block_norm="L2-Hys", feature_vector=True)
    return np.append(features, BIAS)


def shape_hog_descriptor(gray: np.ndarray, *, cell: int, sigma: float) -> np.ndarray:
    """Return the HOG of the Canny edge map: the outline of shapes, without colour or shading."""
    from skimage.feature import canny

    edges = canny(gray, sigma=sigma).astype(np.float64)
    return hog_descriptor(edges, cell=cell)


def lbp_histogram(gray: np.ndarray, *, scales: tuple[tuple[int, float], ...]) -> np.ndarray:
    """Return uniform rotation-invariant LBP histograms, one per (points, radius), each summing to 1/len(scales)."""
    from skimage.feature import local_binary_pattern

    image = np.round(gray * 255).astype(np.uint8)
    parts = []
    for points, radius in scales:
        codes = local_binary_pattern(image, points, radius, method="uniform").astype(np.int64)
        counts = np.bincount(codes.ravel(), minlength=points + 2).astype(np.float64)
        parts.append(counts / counts.sum() / len(scales))
    return np.concatenate(parts)


def tiny_image(rgb: np.ndarray) -> np.ndarray:
    """Return the RGB pixels in [0, 1] of the already shrunk image, row-major, with the bias component."""
    return np.append(rgb.astype(np.float64).ravel(), BIAS)


@dataclasses.dataclass(frozen=True)
class DescriptorExtractor:
    """An Extractor whose `preprocess` computes the descriptor and whose `embed` stacks them."""

    representation: Representation
    compute: Callable[[np.ndarray], np.ndarray]

    def preprocess(self, image: Image.Image) -> np.ndarray:
        rgb = np.asarray(resize_and_crop(image.convert("RGB"), self.representation.input_spec),
                         dtype=np.float64) / 255.0
        vector = self.compute(rgb)
        return vector.astype(np.float32)

    def embed(self, batch: Any) -> np.ndarray:
        """Return float32 [B, D] from a batch of descriptors (a tensor or an array)."""
        return np.asarray(batch, dtype=np.float32).reshape(len(batch), -1)


def _build(representation: Representation, options: BuildOptions, *,
           compute: Callable[[np.ndarray], np.ndarray]) -> DescriptorExtractor:
    del options  # No weights and no device: the descriptor runs in numpy.
    return DescriptorExtractor(representation, compute)


def _descriptor(name: str, description: str, dim: int, spec: InputSpec, layer: str, pooling: str,
                compute: Callable[[np.ndarray], np.ndarray], config: dict[str, Any],
                provenance: str) -> Representation:
    return register(Representation(
        name=name, description=description, output_dim=dim, input_spec=spec, weights=None,
        layer=layer, pooling=pooling, builder=functools.partial(_build, compute=compute), offline=True, groups=("offline", "classical"),
        provenance=provenance, config=tuple(sorted(config.items()))))


_HIST_BINS = 8
_HOG_SIZE, _HOG_CELL = 128, 16
_SHAPE_SIGMA = 2.0
_LBP_SIZE, _LBP_SCALES = 128, ((8, 1.0), (16, 2.0), (24, 3.0))
_TINY_SIZE = 16
_HOG_DIM = ((_HOG_SIZE // _HOG_CELL - 1) ** 2) * 4 * 9 + 1


def _no_normalisation(**kwargs: Any) -> InputSpec:
    return InputSpec(mean=None, std=None, **kwargs)


COLOR_HIST = _descriptor(
    "color_hist", f"joint RGB histogram, {_HIST_BINS}^3 bins, square-rooted", _HIST_BINS ** 3,
    _no_normalisation(resize=128, crop=None, interpolation="bilinear"),
    "RGB pixels", "histogram",
    functools.partial(color_histogram, bins=_HIST_BINS), {"bins": _HIST_BINS},
    "Global colour distribution; blind to layout.")

HOG = _descriptor(
    "hog", f"HOG of the grey image at {_HOG_SIZE}x{_HOG_SIZE}, {_HOG_CELL}-pixel cells", _HOG_DIM,
    _no_normalisation(resize=(_HOG_SIZE, _HOG_SIZE), crop=None, interpolation="bilinear"),
    "grey image gradients", "HOG blocks, concatenated",
    functools.partial(_on_gray, hog_descriptor, cell=_HOG_CELL),
    {"cell": _HOG_CELL, "orientations": 9, "block": 2, "block_norm": "L2-Hys", "bias": BIAS},
    "Gradient layout at a coarse grid; the image is squashed to a square, so aspect is lost.")

SHAPE_HOG = _descriptor(
    "shape_hog", f"HOG of the Canny edge map (sigma {_SHAPE_SIGMA})", _HOG_DIM,
    _no_normalisation(resize=(_HOG_SIZE, _HOG_SIZE), crop=None, interpolation="bilinear"),
    "Canny edges of the grey image", "HOG blocks, concatenated",
    functools.partial(_on_gray, shape_hog_descriptor, cell=_HOG_CELL, sigma=_SHAPE_SIGMA),
    {"cell": _HOG_CELL, "orientations": 9, "block": 2, "block_norm": "L2-Hys", "canny_sigma": _SHAPE_SIGMA,
     "bias": BIAS},
    "Outline shape only: binary edges discard colour, shading and contrast.")

LBP = _descriptor(
    "lbp", "uniform LBP texture histograms at radii 1, 2, 3", sum(p + 2 for p, _ in _LBP_SCALES),
    _no_normalisation(resize=_LBP_SIZE, crop=None, interpolation="bilinear"),
    "grey image", "histogram per scale, concatenated",
    functools.partial(_on_gray, lbp_histogram, scales=_LBP_SCALES), {"scales": _LBP_SCALES},
    "Local texture statistics, rotation invariant; blind to layout and colour.")

TINY_IMAGE = _descriptor(
    "tiny_image", f"{_TINY_SIZE}x{_TINY_SIZE} RGB thumbnail", _TINY_SIZE * _TINY_SIZE * 3 + 1,
    _no_normalisation(resize=(_TINY_SIZE, _TINY_SIZE), crop=None, interpolation="box"),
    "RGB pixels", "box-filter shrink",
    tiny_image, {"size": _TINY_SIZE, "bias": BIAS},
    "Coarse layout and colour; the image is squashed to a square.")
