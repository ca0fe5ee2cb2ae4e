"""An on-disk cache of per-category arrays: channel profiles and baseline distances.

Layout::

    CACHE_DIR/<task>/<split>/<category>/<kind>-<key>/
        <array>.npy ...
        meta.json       the full fingerprint and each array's shape, dtype and SHA-256

`kind` names the content ("labels", "baselines", "alex-v0.1", ...) and `key`
is the first 16 hex digits of the SHA-256 of the fingerprint (the dataset
files' fingerprint plus every setting that changes the arrays). An entry is
written to a temporary directory and renamed into place only when complete,
so an interrupted or failing run leaves every earlier entry as it was.

Loading checks the fingerprint stored in meta.json against the expected one,
and each array's shape, dtype and checksum against meta.json. An entry that
fails any check is reported in the log and treated as missing; it is never
reused, and the next `save` replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from engine import store

META_NAME = "meta.json"
FORMAT_VERSION = 1


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """Return the 16-hex-digit key of a JSON-serialisable fingerprint."""
    canonical = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def entry_dir(cache_dir: str, where: tuple[str, str, str], kind: str, fingerprint: Mapping[str, Any]) -> str:
    """Return the directory of the entry for (task, split, category) `where`, `kind` and `fingerprint`."""
    return os.path.join(cache_dir, *where, f"{kind}-{fingerprint_key(fingerprint)}")


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def load(
    cache_dir: str,
    where: tuple[str, str, str],
    kind: str,
    fingerprint: Mapping[str, Any],
) -> dict[str, np.ndarray] | None:
    """Return the arrays of a valid entry, or None when it is missing or fails a check (logged)."""
    directory = entry_dir(cache_dir, where, kind, fingerprint)
    if not os.path.isdir(directory):
        return None
    try:
        return _load_checked(directory, fingerprint)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logging.warning("cache entry %s is invalid and will be recomputed, not reused: %s", directory, e)
        return None


def _load_checked(directory: str, fingerprint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    with open(os.path.join(directory, META_NAME), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')} != {FORMAT_VERSION}")
    expected = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    if meta.get("fingerprint") != expected:
        raise ValueError("its stored fingerprint differs from the expected one")
    arrays = {}
    for name, info in meta["arrays"].items():
        array = np.load(os.path.join(directory, f"{name}.npy"), allow_pickle=False)
        if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
            raise ValueError(f"{name}.npy has shape {array.shape} and dtype {array.dtype}, "
                             f"meta.json records {info['shape']} and {info['dtype']}")
        if _array_digest(array) != info["sha256"]:
            raise ValueError(f"{name}.npy does not match its checksum")
        arrays[name] = array
    return arrays


def save(
    cache_dir: str,
    where: tuple[str, str, str],
    kind: str,
    fingerprint: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
) -> str:
    """Write an entry atomically (complete or not at all) and return its directory."""
    directory = entry_dir(cache_dir, where, kind, fingerprint)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        meta = {"format_version": FORMAT_VERSION, "kind": kind,
                "fingerprint": json.loads(json.dumps(fingerprint, sort_keys=True, default=str)), "arrays": {}}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            store.write_array(os.path.join(staging, f"{name}.npy"), array)
            meta["arrays"][name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                                    "sha256": _array_digest(array)}
        store.write_json(os.path.join(staging, META_NAME), meta)
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_directory(staging: str, directory: str) -> None:
    # A directory cannot be renamed over a non-empty one, so an invalid entry
    # is first moved aside and removed only after the new one is in place.
    if not os.path.exists(directory):
        os.replace(staging, directory)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old.", dir=os.path.dirname(directory))
    os.rmdir(aside)
    os.replace(directory, aside)
    os.replace(staging, directory)
    shutil.rmtree(aside, ignore_errors=True)
