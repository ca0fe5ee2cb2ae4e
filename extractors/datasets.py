"""Retrieval datasets: N left images paired with the first N of G right images.

A `PairDataset` lists image references; nothing is decoded until extraction.
Layouts:

- TLL as two folders, `left/` and `right/`, with matching file names.
- TLL as side-by-side images, each cut into a left and a right half by a
  configurable crop (the original TLL code keeps rows 0-244 and columns
  0-399, split into two 200-column halves).
- A pairs CSV with one `left,right` row per pair. A row with an empty left
  cell adds a distractor, which becomes a right row after the N matches.
- The demo set built from scikit-image's photographs (`extractors.demo`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset that cannot be read as given; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image: a file, optionally cut to a box.

    Attributes:
      path: the image file.
      box: (left, upper, right, lower) pixel box kept from the decoded image, or None.
    """

    path: str
    box: tuple[int, int, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class PairDataset:
    """Left images [N] and right images [G], right i the match of left i for i < N.

    Attributes:
      name: the dataset's name in manifests ("demo", "tll", "pairs").
      left, right: image references, N and G of them.
      left_ids, right_ids: stable ids for reports (file names relative to the data root).
      config: layout settings that change which pixels are read (e.g. the crop).
      root: the data directory, for messages.
    """

    name: str
    left: tuple[ImageRef, ...]
    right: tuple[ImageRef, ...]
    left_ids: tuple[str, ...]
    right_ids: tuple[str, ...]
    config: tuple[tuple[str, Any], ...] = ()
    root: str = ""

    def __post_init__(self):
        if not self.left:
            raise DatasetError(f"dataset {self.name!r} at {self.root!r} has no pairs.")
        if len(self.right) < len(self.left):
            raise DatasetError(f"dataset {self.name!r}: {len(self.right)} right images for {len(self.left)} "
                               "left images; every left image needs its match.")
        if len(self.left_ids) != len(self.left) or len(self.right_ids) != len(self.right):
            raise DatasetError(f"dataset {self.name!r}: ids and images differ in number.")

    @property
    def num_queries(self) -> int:
        return len(self.left)

    @property
    def num_gallery(self) -> int:
        return len(self.right)

    def fingerprint(self) -> str:
        """Return the sha256 of the layout config, the ids and every file's bytes, in order."""
        digest = hashlib.sha256()
        digest.update(repr((self.name, self.config, self.left_ids, self.right_ids)).encode())
        digest.update(content_key((*self.left, *self.right)).encode())
        return digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        """Return the manifest's dataset record: name, sizes, ids, fingerprint and layout config."""
        return {
            "name": self.name,
            "root": self.root,
            "num_queries": self.num_queries,
            "num_gallery": self.num_gallery,
            "fingerprint": self.fingerprint(),
            "config": {key: value for key, value in self.config},
            "left_ids": list(self.left_ids),
            "right_ids": list(self.right_ids),
        }

    def subset(self, num_pairs: int) -> "PairDataset":
        """Return the first `num_pairs` pairs without distractors (for quick runs and tests)."""
        return dataclasses.replace(
            self, left=self.left[:num_pairs], right=self.right[:num_pairs],
            left_ids=self.left_ids[:num_pairs], right_ids=self.right_ids[:num_pairs],
            config=self.config + (("subset_pairs", num_pairs),))


def content_key(refs: Sequence[ImageRef]) -> str:
    """Return the sha256 of the files' bytes and boxes of `refs`, in order."""
    digest = hashlib.sha256()
    for ref in refs:
        digest.update(f"{_file_sha256(ref.path)}:{ref.box}\n".encode())
    return digest.hexdigest()


# Content hashes by (path, size, modification time), so that hashing a
# dataset again in the same process reads no file twice.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror}). Check the path and its permissions.") from e
    cache_key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if cache_key in _HASH_CACHE:
        return _HASH_CACHE[cache_key]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror}). Check the path and its permissions.") from e
    _HASH_CACHE[cache_key] = digest.hexdigest()
    return _HASH_CACHE[cache_key]


def load_image(ref: ImageRef) -> Image.Image:
    """Decode `ref` fully into an RGB PIL image, cut to its box.

    Raises:
      DatasetError: the file is missing, not an image, truncated, or smaller than the box.
    """
    try:
        with Image.open(ref.path) as opened:
            opened.load()
            image = opened.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetError(f"{ref.path}: image file not found. Restore it or remove its pair.") from e
    except UnidentifiedImageError as e:
        raise DatasetError(f"{ref.path}: not a readable image file. Replace it with a valid "
                           "JPEG or PNG, or remove its pair.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{ref.path}: the image is damaged or truncated ({e}). Replace the file "
                           "or remove its pair.") from e
    if ref.box is not None:
        left, upper, right, lower = ref.box
        if right > image.width or lower > image.height:
            raise DatasetError(
                f"{ref.path}: is {image.width}x{image.height} pixels, too small for the crop box "
                f"{ref.box} (left, upper, right, lower). Pass a smaller crop for this layout.")
        image = image.crop(ref.box)
    return image


def _list_images(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))


def tll_folders(data_dir: str) -> PairDataset:
    """Read TLL as `left/` and `right/` folders whose file names match one to one.

    Raises:
      DatasetError: a missing folder, an empty folder, or a file without its counterpart.
    """
    left_dir, right_dir = os.path.join(data_dir, "left"), os.path.join(data_dir, "right")
    for directory in (left_dir, right_dir):
        if not os.path.isdir(directory):
            raise DatasetError(f"{directory}: folder not found. The folder layout of TLL needs left/ and "
                               "right/ with matching file names.")
    left_files, right_files = _list_images(left_dir), _list_images(right_dir)
    if not left_files:
        raise DatasetError(f"{left_dir}: contains no image ({', '.join(IMAGE_SUFFIXES)}). Point --data_dir "
                           "at the TLL folder that contains left/ and right/.")
    only_left = sorted(set(left_files) - set(right_files))
    only_right = sorted(set(right_files) - set(left_files))
    if only_left or only_right:
        missing = [os.path.join(right_dir, f) for f in only_left] + [os.path.join(left_dir, f) for f in only_right]
        raise DatasetError(
            f"{len(missing)} pair(s) miss one side, e.g. {missing[:5]} do not exist. Restore those files or "
            "remove the other side of each pair.")
    return PairDataset(
        name="tll", root=data_dir, config=(("layout", "folders"),),
        left=tuple(ImageRef(os.path.join(left_dir, f)) for f in left_files),
        right=tuple(ImageRef(os.path.join(right_dir, f)) for f in left_files),
        left_ids=tuple(f"left/{f}" for f in left_files), right_ids=tuple(f"right/{f}" for f in left_files))


def tll_side_by_side(data_dir: str, *, rows: int = 245, width: int = 400, split: int = 200) -> PairDataset:
    """Read TLL as side-by-side images, keeping rows [0, rows) and cutting columns at `split`.

    The left half is columns [0, split), the right half [split, width). The
    defaults are those of the original TLL code, which drops the caption
    strip below row 245.
    """
    if not 0 < split < width or rows <= 0:
        raise DatasetError(f"invalid side-by-side crop rows={rows}, width={width}, split={split}; "
                           "need rows > 0 and 0 < split < width.")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"{data_dir}: folder not found. Pass --data_dir with the TLL images.")
    files = _list_images(data_dir)
    if not files:
        raise DatasetError(f"{data_dir}: contains no image ({', '.join(IMAGE_SUFFIXES)}) and no left/ and "
                           "right/ folders. Point --data_dir at the TLL images.")
    paths = [os.path.join(data_dir, f) for f in files]
    return PairDataset(
        name="tll", root=data_dir,
        config=(("layout", "side_by_side"), ("rows", rows), ("split", split), ("width", width)),
        left=tuple(ImageRef(p, (0, 0, split, rows)) for p in paths),
        right=tuple(ImageRef(p, (split, 0, width, rows)) for p in paths),
        left_ids=tuple(f"{f}#left" for f in files), right_ids=tuple(f"{f}#right" for f in files))


def tll(data_dir: str, **crop: int) -> PairDataset:
    """Read TLL in whichever layout `data_dir` contains: folders when left/ exists, else side by side."""
    if os.path.isdir(os.path.join(data_dir, "left")) or os.path.isdir(os.path.join(data_dir, "right")):
        return tll_folders(data_dir)
    return tll_side_by_side(data_dir, **crop)


def pairs_csv(path: str) -> PairDataset:
    """Read a pairs CSV: rows `left,right`; an optional header row `left,right`.

    `path` is the CSV file or a directory holding `pairs.csv`. Relative paths
    are relative to the CSV's directory. A row with an empty left cell adds
    its right image as a distractor (a right row after the N matches).
    """
    if os.path.isdir(path):
        path = os.path.join(path, "pairs.csv")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: pairs CSV not found. Pass --data_dir with a CSV file or a folder "
                           "holding pairs.csv (rows: left path, right path).")
    base = os.path.dirname(os.path.abspath(path))
    pairs: list[tuple[str, str]] = []
    distractors: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if line_number == 1 and [c.lower() for c in cells[:2]] == ["left", "right"]:
                continue
            if len(cells) != 2 or not cells[1]:
                raise DatasetError(f"{path}, line {line_number}: expected two cells 'left,right' with a "
                                   f"right path, got {row}. Leave the left cell empty for a distractor.")
            if cells[0]:
                pairs.append((cells[0], cells[1]))
            else:
                distractors.append(cells[1])
    if not pairs:
        raise DatasetError(f"{path}: contains no pair. Add rows 'left path,right path'.")

    def resolve(relative: str) -> str:
        full = relative if os.path.isabs(relative) else os.path.join(base, relative)
        if not os.path.isfile(full):
            raise DatasetError(f"{path}: {full} not found. Fix the path in the CSV or remove its row.")
        return full

    left = [resolve(a) for a, _ in pairs]
    right = [resolve(b) for _, b in pairs] + [resolve(d) for d in distractors]
    return PairDataset(
        name="pairs", root=path, config=(("layout", "pairs_csv"),),
        left=tuple(ImageRef(p) for p in left), right=tuple(ImageRef(p) for p in right),
        left_ids=tuple(a for a, _ in pairs), right_ids=tuple([b for _, b in pairs] + distractors))


DATASETS = ("demo", "tll", "pairs")


def load_dataset(name: str, data_dir: str | None = None, **options: Any) -> PairDataset:
    """Return the dataset `name` ("demo", "tll" or "pairs") read from `data_dir`.

    For "demo", `data_dir` is the cache directory (default: cache/demo in the
    repository) and `options` go to `extractors.demo.demo_dataset`. For "tll"
    the options are the side-by-side crop (`rows`, `width`, `split`).
    """
    if name == "demo":
        from extractors import demo

        return demo.demo_dataset(cache_dir=data_dir, **options)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid: {list(DATASETS)}.")
    if not data_dir:
        raise DatasetError(f"dataset {name!r} needs --data_dir.")
    if name == "tll":
        return tll(data_dir, **options)
    return pairs_csv(data_dir)

