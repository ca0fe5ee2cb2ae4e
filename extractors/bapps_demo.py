"""A tiny BAPPS-layout set built offline from scikit-image photographs.

The images are real photographs (`skimage.data`) with real distortions (blur,
noise, JPEG, contrast, colour shift, down-and-up sampling, sharpening,
ghosting, warping). The human judgments are SYNTHETIC: a simulated observer
perceives each distortion as `strength[kind] * severity`, picks p1 with
probability sigmoid((perceived0 - perceived1) / OBSERVER_TEMPERATURE), and
five simulated people vote (three for JND). Scores on this set show that the
pipeline runs. They do not measure how any metric agrees with people.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
import skimage.data
from absl import logging
from PIL import Image, ImageFilter
from scipy import ndimage

from extractors import bapps
from engine import store

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "camera", "brick", "grass", "gravel", "coins")
OBSERVER_TEMPERATURE = 0.08
JUDGES_2AFC = 5
JUDGES_JND = 3
SYNTHETIC_NOTE = ("The human judgments of this set are SYNTHETIC (a simulated observer); "
                  "its scores only show that the pipeline runs.")


def _blur(image, s, rng):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.3 + 2.5 * s)))


def _noise(image, s, rng):
    return np.clip(image + rng.normal(0, 40 * s, image.shape), 0, 255)


def _jpeg(image, s, rng):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(round(95 - 90 * s)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def _contrast(image, s, rng):
    mean = image.mean(axis=(0, 1), keepdims=True)
    return mean + (image - mean) * (1 - 0.7 * s)


def _colour_shift(image, s, rng):
    direction = rng.normal(size=3)
    return image + 45 * s * direction / np.linalg.norm(direction)


def _saturation(image, s, rng):
    grey = image.mean(axis=2, keepdims=True)
    return grey + (image - grey) * (1 + 1.5 * s * rng.choice([-0.6, 1.0]))


def _down_up(image, s, rng):
    size = image.shape[0]
    small = max(8, int(round(size / (1 + 3 * s))))
    low = Image.fromarray(image).resize((small, small), Image.BILINEAR)
    return np.asarray(low.resize((size, size), Image.BICUBIC))


def _sharpen(image, s, rng):
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0 + s)), np.float64)
    return image + (1.5 + 3 * s) * (image - blurred) * rng.uniform(0.3, 1.0)


def _ghost(image, s, rng):
    shift = 1 + int(round(6 * s))
    moved = np.roll(image, (shift * rng.choice([-1, 1]), shift * rng.choice([-1, 1])), axis=(0, 1))
    return 0.5 * image + 0.5 * moved


def _warp(image, s, rng):
    size = image.shape[0]
    field = [ndimage.zoom(rng.normal(size=(4, 4)), size / 4, order=3)[:size, :size] * 3 * s for _ in range(2)]
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = [rows + field[0], cols + field[1]]
    return np.stack([ndimage.map_coordinates(image[..., c].astype(np.float64), coords, order=1, mode="reflect")
                     for c in range(3)], axis=-1)


# kind -> (function, perceived strength of severity 1)
DISTORTIONS: dict[str, tuple[Callable, float]] = {
    "blur": (_blur, 1.0), "noise": (_noise, 0.8), "jpeg": (_jpeg, 0.7), "contrast": (_contrast, 0.5),
    "colour_shift": (_colour_shift, 0.6), "saturation": (_saturation, 0.4), "down_up": (_down_up, 0.9),
    "sharpen": (_sharpen, 0.6), "ghost": (_ghost, 0.8), "warp": (_warp, 0.7),
}
TRADITIONAL = ("blur", "noise", "jpeg", "contrast")
CNN_LIKE = ("warp", "sharpen", "down_up")
FAMILIES = {
    "traditional": TRADITIONAL, "cnn": CNN_LIKE, "superres": ("down_up",), "deblur": ("sharpen", "blur"),
    "color": ("colour_shift", "saturation"), "frameinterp": ("ghost",), "mix": TRADITIONAL + CNN_LIKE,
}


def _photos() -> list[np.ndarray]:
    photos = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        photos.append(image[..., :3].astype(np.uint8))
    return photos


def _reference_patch(photos, rng, size: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    crop = int(rng.integers(size, 3 * size))
    top = int(rng.integers(0, photo.shape[0] - crop + 1))
    left = int(rng.integers(0, photo.shape[1] - crop + 1))
    patch = Image.fromarray(photo[top:top + crop, left:left + crop])
    return np.asarray(patch.resize((size, size), Image.BILINEAR))


def _distort(image, kind, severity, rng) -> np.ndarray:
    function, _ = DISTORTIONS[kind]
    return np.clip(np.rint(function(image, severity, rng)), 0, 255).astype(np.uint8)


def _perceived(kind: str, severity: float) -> float:
    return DISTORTIONS[kind][1] * severity


def _save_png(path: str, image: np.ndarray) -> None:
    with store.atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def build_demo_set(
    out_dir: str,
    *,
    seed: int = 0,
    size: int = 64,
    counts_2afc: dict[tuple[str, str], int] | None = None,
    count_jnd: int = 24,
) -> str:
    """Write a BAPPS-layout set with synthetic judgments under `out_dir` and return `out_dir`.

    Args:
      out_dir: where 2afc/ and jnd/ go.
      seed: seeds every choice, so a seed gives the same files.
      size: side of the square patches.
      counts_2afc: (split, category) -> triplets; default 16 per val category
        and 32 per train category.
      count_jnd: pairs per JND category (0 for none).
    """
    rng = np.random.default_rng(seed)
    photos = _photos()
    if counts_2afc is None:
        counts_2afc = {("val", c): 16 for c in bapps.CATEGORIES[("2afc", "val")]}
        counts_2afc.update({("train", c): 32 for c in bapps.CATEGORIES[("2afc", "train")]})
    for (split, category), count in counts_2afc.items():
        root = os.path.join(out_dir, "2afc", split, category)
        for index in range(count):
            _write_triplet(root, f"{index:06d}", FAMILIES[category], photos, rng, size)
    if count_jnd:
        for category in bapps.CATEGORIES[("jnd", "val")]:
            root = os.path.join(out_dir, "jnd", "val", category)
            for index in range(count_jnd):
                _write_jnd_pair(root, f"{index:06d}", FAMILIES[category], photos, rng, size)
    logging.info("demo BAPPS set written to %s. %s", out_dir, SYNTHETIC_NOTE)
    return out_dir


def _write_triplet(root, stem, family, photos, rng, size) -> None:
    ref = _reference_patch(photos, rng, size)
    perceived = []
    for folder in ("p0", "p1"):
        kind = family[rng.integers(len(family))]
        severity = float(rng.uniform(0.05, 1.0))
        _save_png(os.path.join(root, folder, f"{stem}.png"), _distort(ref, kind, severity, rng))
        perceived.append(_perceived(kind, severity))
    chose_p1 = 1.0 / (1.0 + np.exp(-(perceived[0] - perceived[1]) / OBSERVER_TEMPERATURE))
    judge = rng.binomial(JUDGES_2AFC, chose_p1) / JUDGES_2AFC
    _save_png(os.path.join(root, "ref", f"{stem}.png"), ref)
    store.write_array(os.path.join(root, "judge", f"{stem}.npy"), np.array([judge], np.float32))


def _write_jnd_pair(root, stem, family, photos, rng, size) -> None:
    p0 = _reference_patch(photos, rng, size)
    kind = family[rng.integers(len(family))]
    severity = 0.0 if rng.random() < 0.25 else float(rng.uniform(0.02, 0.6))
    p1 = p0.copy() if severity == 0.0 else _distort(p0, kind, severity, rng)
    called_same = float(np.exp(-_perceived(kind, severity) / (2 * OBSERVER_TEMPERATURE)))
    same = rng.binomial(JUDGES_JND, called_same) / JUDGES_JND
    _save_png(os.path.join(root, "p0", f"{stem}.png"), p0)
    _save_png(os.path.join(root, "p1", f"{stem}.png"), p1)
    store.write_array(os.path.join(root, "same", f"{stem}.npy"), np.array([same], np.float32))
