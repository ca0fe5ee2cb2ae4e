"""Readers for the BAPPS 2AFC and JND sets in their published layout.

    DATA_DIR/2afc/{train,val}/<category>/{ref,p0,p1,judge}/NNNNNN.{png,npy}
    DATA_DIR/jnd/val/<category>/{p0,p1,same}/NNNNNN.{png,npy}

Files are paired by their stem (the zero-padded index), never by listing
order, and a stem missing from any folder is an error that names it. Images
load as the reference evaluation loads them: RGB, the shorter side resized to
64 pixels (bilinear), values scaled to [-1, 1]. `judge` contains the fraction of
people who chose p1 and `same` the fraction who called the pair identical,
one number in [0, 1] per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

LOAD_SIZE = 64
TASKS = ("2afc", "jnd")
SPLITS = {"2afc": ("train", "val"), "jnd": ("val",)}
CATEGORIES = {
    ("2afc", "train"): ("traditional", "cnn", "mix"),
    ("2afc", "val"): ("traditional", "cnn", "superres", "deblur", "color", "frameinterp"),
    ("jnd", "val"): ("traditional", "cnn"),
}
IMAGE_FOLDERS = {"2afc": ("ref", "p0", "p1"), "jnd": ("p0", "p1")}
LABEL_FOLDER = {"2afc": "judge", "jnd": "same"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class BappsDataError(ValueError):
    """A BAPPS folder, image or label file that is missing or invalid."""


@dataclasses.dataclass(frozen=True)
class Category:
    """The items of one category of one split.

    Attributes:
      name: the category folder name.
      root: its directory.
      stems: [T] the paired file stems, sorted.
      images: folder name ("ref", "p0", "p1") -> [T] image paths in stem order.
      labels: [T] float32 judge (2AFC) or same (JND) values in [0, 1].
      fingerprint: SHA-256 over every file's relative path, size and
        modification time; it changes when any file is added, removed or rewritten.
    """

    name: str
    root: str
    stems: tuple[str, ...]
    images: dict[str, tuple[str, ...]]
    labels: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.stems)


@dataclasses.dataclass(frozen=True)
class BappsSplit:
    """One split of a task: its categories in run order."""

    task: str
    split: str
    root: str
    categories: tuple[Category, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def __len__(self) -> int:
        return sum(len(c) for c in self.categories)


def detect_task(data_dir: str, split: str) -> str:
    """Return "2afc" or "jnd": the task whose `<task>/<split>` folder exists under `data_dir`.

    `data_dir` may also be the task folder itself (its name is "2afc" or "jnd").
    """
    base = os.path.basename(os.path.normpath(data_dir))
    if base in TASKS:
        return base
    found = [task for task in TASKS if os.path.isdir(os.path.join(data_dir, task, split))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise BappsDataError(
            f"{data_dir}: neither 2afc/{split} nor jnd/{split} exists. Point --data_dir at the folder "
            "that contains the unpacked BAPPS archives (2afc/ and jnd/).")
    raise BappsDataError(f"{data_dir} contains both 2afc/{split} and jnd/{split}; pass --task=2afc or --task=jnd.")


def split_dir(data_dir: str, task: str, split: str) -> str:
    base = os.path.basename(os.path.normpath(data_dir))
    root = data_dir if base == task else os.path.join(data_dir, task)
    return os.path.join(root, split)


def read_split(
    data_dir: str,
    task: str,
    split: str,
    categories: Sequence[str] | None = None,
) -> BappsSplit:
    """Read the file lists and labels of one split.

    Args:
      data_dir: the BAPPS root (holding 2afc/ and jnd/) or the task folder.
      task: "2afc" or "jnd".
      split: "train" or "val" (JND has only "val").
      categories: names to read, in this order; None reads every category
        folder present, published ones first in the published order.

    Raises:
      BappsDataError: a missing folder, an unknown category, a stem missing
        from a folder, or an invalid label file.
    """
    if task not in TASKS:
        raise BappsDataError(f"unknown task {task!r}; valid tasks: {list(TASKS)}.")
    if split not in SPLITS[task]:
        raise BappsDataError(f"unknown split {split!r} for {task}; valid splits: {list(SPLITS[task])}.")
    root = split_dir(data_dir, task, split)
    if not os.path.isdir(root):
        raise BappsDataError(f"{root} does not exist. Unpack the BAPPS {task} {split} archive there.")
    present = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    if categories is None:
        published = CATEGORIES[(task, split)]
        names = [c for c in published if c in present] + [c for c in present if c not in published]
    else:
        names = list(categories)
        unknown = [c for c in names if c not in present]
        if unknown:
            raise BappsDataError(
                f"unknown category {unknown} in {root}; available: {present}. Fix --categories.")
    if not names:
        raise BappsDataError(f"{root} contains no category folder; unpack the BAPPS archive there.")
    return BappsSplit(task, split, root, tuple(_read_category(task, os.path.join(root, n)) for n in names))


def _read_category(task: str, root: str) -> Category:
    folders = (*IMAGE_FOLDERS[task], LABEL_FOLDER[task])
    by_folder: dict[str, dict[str, str]] = {}
    digest = hashlib.sha256()
    for folder in folders:
        directory = os.path.join(root, folder)
        if not os.path.isdir(directory):
            raise BappsDataError(f"{directory} is missing; a {task} category needs the folders {list(folders)}.")
        suffixes = (".npy",) if folder == LABEL_FOLDER[task] else IMAGE_SUFFIXES
        files = {}
        for entry in sorted(os.listdir(directory)):
            stem, suffix = os.path.splitext(entry)
            if suffix.lower() not in suffixes:
                continue
            if stem in files:
                raise BappsDataError(f"{directory} contains two files with stem {stem!r}; keep one.")
            path = os.path.join(directory, entry)
            stat = os.stat(path)
            digest.update(f"{folder}/{entry}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            files[stem] = path
        by_folder[folder] = files
    stems = sorted(set().union(*(set(f) for f in by_folder.values())))
    for folder, files in by_folder.items():
        missing = [s for s in stems if s not in files]
        if missing:
            raise BappsDataError(
                f"{os.path.join(root, folder)}: no file for stem(s) {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing), which other folders of "
                f"{root} have. Restore the files or remove those stems from every folder.")
    if not stems:
        raise BappsDataError(f"{root} contains no items; restore the category from the BAPPS archive.")
    label_folder = LABEL_FOLDER[task]
    labels = np.array([read_label(by_folder[label_folder][s]) for s in stems], np.float32)
    images = {folder: tuple(by_folder[folder][s] for s in stems) for folder in IMAGE_FOLDERS[task]}
    return Category(os.path.basename(root), root, tuple(stems), images, labels, digest.hexdigest())


def read_label(path: str) -> float:
    """Read one judge or same file: a single number in [0, 1]."""
    try:
        value = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BappsDataError(f"{path}: not a readable .npy file ({e}). Restore it from the BAPPS archive.") from e
    if value.size != 1 or value.ndim > 1 or not np.issubdtype(value.dtype, np.number):
        raise BappsDataError(
            f"{path}: expected one number (shape (1,) or ()), got dtype {value.dtype} and shape {value.shape}. "
            "Restore it from the BAPPS archive.")
    number = float(value.reshape(-1)[0])
    if not 0.0 <= number <= 1.0:
        raise BappsDataError(
            f"{path}: value {number} is outside [0, 1]; it must be the fraction of people who chose p1 "
            "(judge) or called the pair the same (same). Restore it from the BAPPS archive.")
    return number


def resized_size(width: int, height: int, load_size: int = LOAD_SIZE) -> tuple[int, int]:
    """Return (width, height) with the shorter side `load_size`, as torchvision's Resize(int) computes it."""
    if width <= height:
        return load_size, int(load_size * height / width)
    return int(load_size * width / height), load_size


def load_image(path: str, load_size: int = LOAD_SIZE) -> np.ndarray:
    """Load an image as float32 [H, W, 3] in [-1, 1], the shorter side resized to `load_size`.

    Raises:
      BappsDataError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            size = resized_size(*image.size, load_size)
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise BappsDataError(
            f"{path}: unreadable image ({e}). Restore it from the BAPPS archive or remove its stem "
            "from every folder of the category.") from e
    return array / 127.5 - 1.0


def load_images(paths: Sequence[str], load_size: int = LOAD_SIZE) -> np.ndarray:
    """Load images of one size into float32 [B, H, W, 3] in [-1, 1]."""
    images = [load_image(p, load_size) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise BappsDataError(
            f"images of one batch have different sizes {sorted(shapes)} after resizing (first: {paths[0]}); "
            "BAPPS patches are square, so check the files.")
    return np.stack(images)


def embedding_runner(entry: Any, options: Any) -> Any:
    """Return an `engine.bapps_pipeline.EmbeddingRunner` for a retrieval representation.

    The extractor is built on first use, so a run whose embeddings are all
    cached never imports torch. Each patch, as loaded here (64 pixels, values
    in [-1, 1]), goes back to an 8-bit RGB image and through the entry's own
    preprocessing, which resizes it to the input size the entry expects.

    Args:
      entry: an `extractors.registry.Representation`.
      options: the `extractors.registry.BuildOptions` it is built with.
    """
    from engine import bapps_pipeline

    def make_embed():
        import torch

        extractor = entry.build(options)
        variable = dict(extractor.representation.config).get("variable_input_size", False)

        def embed(images: np.ndarray) -> np.ndarray:
            pixels = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
            inputs = [extractor.preprocess(Image.fromarray(image)) for image in pixels]
            batch = inputs if variable else torch.utils.data.default_collate(inputs)
            with torch.inference_mode():
                return np.asarray(extractor.embed(batch), dtype=np.float32)

        return embed

    fingerprint = {"representation": entry.fingerprint(), "input": "bapps patch as 8-bit RGB"}
    return bapps_pipeline.EmbeddingRunner(entry.name, fingerprint, make_embed)
