"""The demo retrieval set, built offline from the photographs scikit-image ships.

Each pair is two views of the same region of one real photograph: the left
view a square crop, the right view an overlapping crop at another scale and
position, possibly mirrored, with other brightness, contrast, saturation and
blur. The pairing is synthetic (the views come from the same scene by
construction), not a human similarity judgment. Many pairs come from each
photograph, and extra views of the same photographs are appended as
distractors, so a view competes with other crops of the same scene and
recall@1 stays below saturation.

The build is deterministic for given settings (one seeded generator per
photograph) and is cached as JPEG files under the cache directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageFilter

from extractors.datasets import ImageRef, PairDataset

# Real photographs that scikit-image ships in its wheel (no download).
# skimage.data.cat is the same photograph as chelsea, and the right view of
# stereo_motorcycle shows the same scene as its left view, so both are left out.
PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
    "motorcycle")

FORMAT_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Root of the demo images and of cached feature stores; FACETS_CACHE_DIR moves it.
CACHE_ROOT = os.environ.get("FACETS_CACHE_DIR") or os.path.join(REPO_ROOT, "cache")
DEFAULT_CACHE_DIR = os.path.join(CACHE_ROOT, "demo")
_INFO_NAME = "demo.json"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo set; every field changes the images.

    Attributes:
      photos: scikit-image photograph names, in order.
      pairs_per_photo: pairs cut from each photograph; N = len(photos) * pairs_per_photo.
      distractors_per_photo: unpaired right views per photograph; G = N + len(photos) * this.
      view_size: side of every stored view in pixels.
      seed: base seed; photograph p uses the generator seeded with (seed, p).
      jpeg_quality: quality of the stored JPEG files.
    """

    photos: tuple[str, ...] = PHOTOS
    pairs_per_photo: int = 12
    distractors_per_photo: int = 4
    view_size: int = 192
    seed: int = 20181018
    jpeg_quality: int = 90

    def key(self) -> str:
        """Return the cache sub-directory name for these settings."""
        photos = "all" if self.photos == PHOTOS else "-".join(self.photos)
        return (f"v{FORMAT_VERSION}-{photos}-p{self.pairs_per_photo}-d{self.distractors_per_photo}"
                f"-s{self.view_size}-r{self.seed}-q{self.jpeg_quality}")


def load_photo(name: str) -> np.ndarray:
    """Return scikit-image's photograph `name` as uint8 RGB [H, W, 3]."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown demo photograph {name!r}; valid: {list(PHOTOS)}.")
    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _left_box(rng: np.random.Generator, width: int, height: int) -> tuple[float, float, float]:
    side = rng.uniform(0.3, 0.55) * min(width, height)
    cx = rng.uniform(side / 2, width - side / 2)
    cy = rng.uniform(side / 2, height - side / 2)
    return cx, cy, side


def _right_box(rng: np.random.Generator, left: tuple[float, float, float], width: int,
               height: int) -> tuple[float, float, float]:
    # Another scale (0.7x to 1.4x) and a shift of up to a quarter of the side, kept inside the photo.
    cx, cy, side = left
    side = min(side * float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))), min(width, height))
    cx = float(np.clip(cx + rng.uniform(-0.25, 0.25) * side, side / 2, width - side / 2))
    cy = float(np.clip(cy + rng.uniform(-0.25, 0.25) * side, side / 2, height - side / 2))
    return cx, cy, side


def _render(photo: Image.Image, box: tuple[float, float, float], rng: np.random.Generator, *,
            size: int, strength: float) -> Image.Image:
    cx, cy, side = box
    crop = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    view = photo.resize((size, size), Image.Resampling.BICUBIC, box=crop)
    if rng.random() < 0.5 * strength:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance, spread in ((ImageEnhance.Brightness, 0.3), (ImageEnhance.Contrast, 0.35),
                            (ImageEnhance.Color, 0.5)):
        view = enhance(view).enhance(1.0 + rng.uniform(-spread, spread) * strength)
    radius = rng.uniform(0.0, 2.0) * strength
    if radius > 0.2:
        view = view.filter(ImageFilter.GaussianBlur(radius))
    return view


def _views_of_photo(index: int, name: str, config: DemoConfig) -> tuple[list[Image.Image], list[Image.Image],
                                                                           list[Image.Image]]:
    rng = np.random.default_rng([config.seed, index])
    photo = Image.fromarray(load_photo(name))
    width, height = photo.size
    lefts, rights, distractors = [], [], []
    for _ in range(config.pairs_per_photo):
        left_box = _left_box(rng, width, height)
        right_box = _right_box(rng, left_box, width, height)
        lefts.append(_render(photo, left_box, rng, size=config.view_size, strength=0.3))
        rights.append(_render(photo, right_box, rng, size=config.view_size, strength=1.0))
    for _ in range(config.distractors_per_photo):
        distractors.append(_render(photo, _left_box(rng, width, height), rng, size=config.view_size,
                                   strength=1.0))
    return lefts, rights, distractors


def build_demo(directory: str, config: DemoConfig) -> None:
    """Write the demo views of `config` into `directory` (left/, right/ and demo.json)."""
    os.makedirs(os.path.join(directory, "left"), exist_ok=True)
    os.makedirs(os.path.join(directory, "right"), exist_ok=True)
    left_ids, right_ids, distractor_ids = [], [], []

    def save(image: Image.Image, relative: str) -> None:
        image.save(os.path.join(directory, relative), format="JPEG", quality=config.jpeg_quality)

    for index, name in enumerate(config.photos):
        lefts, rights, distractors = _views_of_photo(index, name, config)
        for j, (left, right) in enumerate(zip(lefts, rights)):
            left_ids.append(f"left/{name}-{j:03d}.jpg")
            right_ids.append(f"right/{name}-{j:03d}.jpg")
            save(left, left_ids[-1])
            save(right, right_ids[-1])
        for j, image in enumerate(distractors):
            distractor_ids.append(f"right/{name}-distractor-{j:03d}.jpg")
            save(image, distractor_ids[-1])
    info = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(config),
            "left": left_ids, "right": right_ids + distractor_ids,
            "note": "Synthetic pairs: two views of the same photograph region, not human judgments."}
    with open(os.path.join(directory, _INFO_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def demo_dataset(cache_dir: str | None = None, *, config: DemoConfig | None = None) -> PairDataset:
    """Return the demo set, building and caching it on first use.

    Args:
      cache_dir: where built sets are kept (default: cache/demo in the repository);
        each configuration gets its own sub-directory.
      config: the settings; the default gives N = 216 pairs and G = 288.

    The build goes to a temporary directory that is renamed into place, so an
    interrupted build leaves no half-built set behind.
    """
    config = config or DemoConfig()
    cache_dir = os.path.abspath(cache_dir or DEFAULT_CACHE_DIR)
    directory = os.path.join(cache_dir, config.key())
    info_path = os.path.join(directory, _INFO_NAME)
    if not os.path.isfile(info_path):
        logging.info("Building the demo set in %s (one time)", directory)
        os.makedirs(cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{config.key()}.", dir=cache_dir)
        try:
            build_demo(staging, config)
            if os.path.isfile(info_path):  # Another process finished the same build first.
                shutil.rmtree(staging)
            else:
                os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    left_ids, right_ids = tuple(info["left"]), tuple(info["right"])
    return PairDataset(
        name="demo", root=directory,
        config=(("demo", config.key()),),
        left=tuple(ImageRef(os.path.join(directory, i)) for i in left_ids),
        right=tuple(ImageRef(os.path.join(directory, i)) for i in right_ids),
        left_ids=left_ids, right_ids=right_ids)
