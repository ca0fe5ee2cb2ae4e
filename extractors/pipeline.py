"""Extraction into the feature store, resumable and atomic.

`prepare_features` extracts every requested representation of a dataset
into FEATURES_DIR/<name>/{left,right}.npy and records it in manifest.json.
The images are the N left images followed by the G right images. They are
embedded in chunks, and each finished chunk is written atomically to
FEATURES_DIR/<name>/.partial-<config>-c<chunk size>/, named by its position
and a hash of its images' bytes. A rerun computes only the chunks that are
missing, so it resumes after an interruption, and after a damaged image is
replaced it recomputes only that image's chunk. Only when all chunks exist are left.npy and right.npy
written (atomically) and the representation listed in the manifest, so a
store never lists a representation whose arrays are incomplete.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from engine import store
from extractors import datasets, demo, registry
from extractors.datasets import DatasetError, ImageRef, PairDataset

CHUNK_SIZE = 256
# Parent directory of the stores written when the caller names none.
FEATURES_CACHE_DIR = os.path.join(demo.CACHE_ROOT, "features")
MANIFEST_FORMAT = 1


class ExtractionError(RuntimeError):
    """An extraction that cannot finish; what was already extracted stays on disk."""


def prepare_features(*, dataset: str | PairDataset = "demo", data_dir: str | None = None,
                     representations: str = "offline", features_dir: str | None = None,
                     weights_dir: str | None = None, batch_size: int = 32, num_workers: int = 0,
                     device: str | None = None, trust_checkpoints: bool = False) -> str:
    """Extract the requested representations of a dataset into a feature store.

    Representations already in the store for the same dataset and the same
    extractor config are reused; an interrupted run resumes at its first
    unfinished chunk.

    Args:
      dataset: "demo", "tll" or "pairs", or a PairDataset built by the caller
        (e.g. TLL side by side with a non-default crop).
      data_dir: the dataset's directory (for "demo": its cache directory).
      representations: comma-separated names and groups, e.g. "offline" or
        "effnet_lite0,hog,timm:convnext_tiny".
      features_dir: the store to write; None uses cache/features/<dataset>-<fingerprint>.
      weights_dir: the directory searched first for weight files.
      batch_size: images per forward pass.
      num_workers: DataLoader worker processes that decode and preprocess images.
      device: torch device; None picks "cuda" when available, else "cpu".
      trust_checkpoints: load checkpoints that need full unpickling (only
        for files the user trusts: unpickling can run code).

    Returns:
      The feature store directory, which contains every requested representation.

    Raises:
      KeyError: an unknown representation name (the message lists the valid ones).
      checkpoints.MissingWeightsError: an explicitly named representation whose weights are absent.
      DatasetError: an unreadable dataset or image; finished work stays on disk.
      ExtractionError: a mismatch with an existing store, or an invalid feature row.
    """
    if isinstance(dataset, str):
        dataset = datasets.load_dataset(dataset, data_dir)
    entries = select_representations(representations, weights_dir)
    identity = dataset.identity()
    if features_dir is None:
        features_dir = os.path.join(FEATURES_CACHE_DIR, f"{dataset.name}-{identity['fingerprint'][:12]}")
    features_dir = os.path.abspath(features_dir)
    manifest = _open_manifest(features_dir, identity)
    options = registry.BuildOptions(weights_dir=weights_dir, device=device or default_device(),
                                    trust_checkpoints=trust_checkpoints)
    for entry in entries:
        if _is_complete(features_dir, manifest, entry):
            logging.info("%s: already extracted in %s, reusing it", entry.name, features_dir)
            continue
        record = extract_representation(entry, dataset, features_dir, options=options, batch_size=batch_size,
                                        num_workers=num_workers, dataset_fingerprint=identity["fingerprint"])
        manifest = _record(features_dir, manifest, entry.name, record)
    return features_dir


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def select_representations(selection: str | Sequence[str], weights_dir: str | None) -> list[registry.Representation]:
    """Resolve a selection; skip group members whose weights are missing, with a warning.

    A representation named explicitly whose weights are missing is an error,
    because the user asked for it by name.
    """
    from extractors import checkpoints

    items = [s.strip() for s in selection.split(",")] if isinstance(selection, str) else list(selection)
    items = [item for item in items if item]
    groups = {group for name in registry.names() for group in registry.get(name).groups}
    chosen: list[registry.Representation] = []
    for item in items:
        for entry in registry.resolve([item]):
            if any(entry.name == c.name for c in chosen):
                continue
            try:
                entry.find_weights(weights_dir)
            except checkpoints.MissingWeightsError as e:
                if item not in groups:
                    raise
                logging.warning("Skipping %s from group %r: %s", entry.name, item, e)
                continue
            chosen.append(entry)
    if not chosen:
        raise ExtractionError(f"no representation of {selection!r} has its weights on this machine; "
                         f"see --list_representations (groups: {sorted(groups)}).")
    return chosen


def config_key(entry: registry.Representation, identity: dict[str, Any]) -> str:
    """Return a short hash of the entry's fingerprint and the dataset fingerprint."""
    text = json.dumps({"representation": entry.fingerprint(), "dataset": identity["fingerprint"]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _open_manifest(features_dir: str, identity: dict[str, Any]) -> dict[str, Any]:
    manifest = store.read_manifest(features_dir) if os.path.isdir(features_dir) else None
    if manifest is None:
        return {"format": MANIFEST_FORMAT, "representations": [], "dataset": identity, "extractors": {}}
    recorded = manifest.get("dataset", {})
    same_source = all(recorded.get(k) == identity[k] for k in ("name", "root", "config"))
    if recorded.get("fingerprint") != identity["fingerprint"] and same_source:
        # The same dataset with changed files (e.g. a damaged image replaced): every
        # representation is extracted again, reusing unfinished chunks of unchanged images.
        logging.warning("The images of %s changed since %s was written; extracting every representation again",
                        identity["root"], features_dir)
        return {"format": MANIFEST_FORMAT, "representations": [], "dataset": identity, "extractors": {}}
    if recorded.get("fingerprint") != identity["fingerprint"]:
        raise ExtractionError(
            f"{os.path.join(features_dir, store.MANIFEST_NAME)} belongs to dataset {recorded.get('name')!r} "
            f"with fingerprint {str(recorded.get('fingerprint'))[:12]}, not to {identity['name']!r} "
            f"({identity['fingerprint'][:12]}) at {identity['root']}. Pass another --features_dir "
            "(or omit it to use a cache directory keyed by dataset), or delete that directory.")
    manifest.setdefault("representations", [])
    manifest.setdefault("extractors", {})
    return manifest


def _is_complete(features_dir: str, manifest: dict[str, Any], entry: registry.Representation) -> bool:
    record = manifest["extractors"].get(entry.name)
    if entry.name not in manifest["representations"] or record is None:
        return False
    if record.get("config_key") != config_key(entry, manifest["dataset"]):
        logging.info("%s: its extractor config changed since %s; extracting again",
                     entry.name, record.get("created"))
        return False
    directory = os.path.join(features_dir, entry.name)
    return all(os.path.isfile(os.path.join(directory, n)) for n in (store.LEFT_NAME, store.RIGHT_NAME))


def _record(features_dir: str, manifest: dict[str, Any], name: str, record: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["extractors"] = {**manifest["extractors"], name: record}
    if name not in manifest["representations"]:
        manifest["representations"] = [*manifest["representations"], name]
    store.write_manifest(features_dir, manifest)
    return manifest


class _ImageDataset:
    """torch-style map dataset: image i decoded, cut to its box and preprocessed."""

    def __init__(self, refs: Sequence[ImageRef], preprocess: Any):
        self.refs = refs
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Any:
        return self.preprocess(datasets.load_image(self.refs[index]))


def extract_representation(entry: registry.Representation, dataset: PairDataset, features_dir: str, *,
                           options: registry.BuildOptions, batch_size: int = 32, num_workers: int = 0,
                           chunk_size: int | None = None, dataset_fingerprint: str | None = None) -> dict[str, Any]:
    """Extract one representation into FEATURES_DIR/<name>/ and return its manifest record.

    Finished chunks of the same extractor config and the same image bytes
    are reused, so a rerun computes only the missing ones.
    `dataset_fingerprint` saves hashing the images again when the caller has it.
    """
    chunk_size = chunk_size or CHUNK_SIZE
    key = config_key(entry, {"fingerprint": dataset_fingerprint or dataset.fingerprint()})
    directory = os.path.join(features_dir, entry.name)
    # The chunk size is part of the name: chunks of another size must not be mixed in.
    entry_key = hashlib.sha256(json.dumps(entry.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()
    partial = os.path.join(directory, f".partial-{entry_key[:16]}-c{chunk_size}")
    _remove_stale_partials(directory, keep=partial)
    os.makedirs(partial, exist_ok=True)

    weights_path = entry.find_weights(options.weights_dir)
    extractor = entry.build(options)
    refs = (*dataset.left, *dataset.right)
    ids = (*dataset.left_ids, *dataset.right_ids)
    chunks = [(start, _chunk_path(partial, start, refs[start:start + chunk_size]))
              for start in range(0, len(refs), chunk_size)]
    started = time.perf_counter()
    computed = _extract_chunks(extractor, entry.name, refs, ids, chunks, chunk_size=chunk_size,
                               batch_size=batch_size, num_workers=num_workers)
    seconds = time.perf_counter() - started

    features = np.concatenate([np.load(path) for _, path in chunks], axis=0)
    store.write_array(os.path.join(directory, store.RIGHT_NAME), features[dataset.num_queries:])
    store.write_array(os.path.join(directory, store.LEFT_NAME), features[:dataset.num_queries])
    shutil.rmtree(partial, ignore_errors=True)
    logging.info("%s: %d images in %.1f s -> %s", entry.name, computed, seconds, directory)
    return {
        "config_key": key,
        "extractor": entry.fingerprint(),
        "weights": dataclasses.asdict(entry.weights) if entry.weights else None,
        "weights_file": weights_path,
        "preprocessing": dataclasses.asdict(entry.input_spec) if entry.input_spec else None,
        "provenance": entry.provenance,
        "output_dim": int(features.shape[1]),
        "dtype": str(features.dtype),
        "device": options.device,
        "images_computed": computed,
        "seconds": round(seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def _chunk_path(partial: str, start: int, refs: Sequence[ImageRef]) -> str:
    return os.path.join(partial, f"chunk-{start:09d}-{datasets.content_key(refs)[:16]}.npy")


def _remove_stale_partials(directory: str, keep: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".partial-") and path != keep:
            logging.info("Removing partial results of an older config: %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _extract_chunks(extractor: Any, name: str, refs: Sequence[ImageRef], ids: Sequence[str],
                    chunks: Sequence[tuple[int, str]], *, chunk_size: int, batch_size: int,
                    num_workers: int) -> int:
    import torch
    from tqdm.auto import tqdm

    todo = [(start, path) for start, path in chunks if not os.path.isfile(path)]
    done_images = len(refs) - sum(min(chunk_size, len(refs) - start) for start, _ in todo)
    if done_images:
        logging.info("%s: resuming, %d of %d images already extracted", name, done_images, len(refs))
    # One DataLoader for all missing chunks (workers start once), with batches
    # that never cross a chunk boundary, so each chunk is written when its last batch arrives.
    batches = [list(range(first, min(first + batch_size, start + chunk_size, len(refs))))
               for start, _ in todo for first in range(start, min(start + chunk_size, len(refs)), batch_size)]
    path_of = dict(todo)
    loader = torch.utils.data.DataLoader(
        _ImageDataset(refs, extractor.preprocess), batch_sampler=batches, num_workers=num_workers,
        pin_memory=str(getattr(extractor, "device", "cpu")).startswith("cuda"))
    computed = 0
    rows: list[np.ndarray] = []
    with tqdm(total=len(refs), initial=done_images, desc=name, unit="img", leave=False) as bar:
        for indices, batch in zip(batches, loader):
            rows.append(np.asarray(extractor.embed(batch), dtype=np.float32))
            bar.update(len(indices))
            start = indices[0] - (indices[0] % chunk_size)
            if indices[-1] + 1 < min(start + chunk_size, len(refs)):
                continue
            features = np.concatenate(rows, axis=0)
            rows = []
            _check_rows(features, name, ids[start:start + chunk_size], refs[start:start + chunk_size])
            store.write_array(path_of[start], features)
            computed += len(features)
    return computed


def _check_rows(features: np.ndarray, name: str, ids: Sequence[str], refs: Sequence[ImageRef]) -> None:
    if features.ndim != 2 or features.shape[0] != len(refs):
        raise ExtractionError(f"{name}: the extractor returned shape {features.shape} for {len(refs)} images; "
                              "expected [images, D].")
    bad = ~np.isfinite(features).all(axis=1) | ~features.any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ExtractionError(
            f"{name}: the features of {refs[row].path} ({ids[row]}) are all zero or not finite, so "
            "their cosine similarity is undefined. Check the image, or drop its pair from the dataset.")


def _versions() -> dict[str, str]:
    import PIL
    import skimage
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "scikit-image": skimage.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


__all__ = ["prepare_features", "extract_representation", "select_representations", "ExtractionError",
           "DatasetError"]
