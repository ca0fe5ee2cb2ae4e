"""The feature store: per-representation feature arrays on disk.

Layout (the seam between extractors and the engine, so users can bring
features from any tool)::

    FEATURES_DIR/
      manifest.json            optional: representation order, dataset, provenance
      <representation>/left.npy   [N, D] float32 or float16
      <representation>/right.npy  [G, D], G >= N; row i of left pairs with row i
                                  of right, rows N..G-1 are extra distractors

Without a manifest, the representations are the sub-directories that hold a
`left.npy`, in sorted order. Every write goes to a temporary name in the same
directory and is renamed into place, so an interrupted writer never leaves a
file that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
LEFT_NAME = "left.npy"
RIGHT_NAME = "right.npy"
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class FeatureStoreError(ValueError):
    """Invalid or missing data in a feature store; the message names the file and the fix."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside `path` and rename it onto `path` on success.

    The temporary file keeps the final suffix so that libraries which append
    one (numpy, matplotlib) write exactly to that path. On an exception
    the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file readable by its owner only; give the result
        # the permissions an ordinary open() would, following the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_array(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as a .npy file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def read_manifest(features_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the parsed manifest.json of a feature store, or None when it has none."""
    path = os.path.join(features_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise FeatureStoreError(f"{path}: invalid JSON ({e}). Fix or delete the manifest.") from e
    if not isinstance(manifest, dict):
        raise FeatureStoreError(f"{path}: expected a JSON object, got {type(manifest).__name__}.")
    return manifest


def write_manifest(features_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    write_json(os.path.join(features_dir, MANIFEST_NAME), manifest)


def list_representations(features_dir: str | os.PathLike[str]) -> list[str]:
    """Return the representation order of a feature store.

    The manifest's `representations` list when it has one (restricted to
    those present on disk is not done: a listed but missing one is an error
    at load time), else the sorted sub-directories that hold a left.npy.
    """
    features_dir = os.fspath(features_dir)
    if not os.path.isdir(features_dir):
        raise FeatureStoreError(
            f"feature store {features_dir!r} does not exist or is not a directory. "
            "Pass --features_dir pointing at a directory with one sub-directory per "
            "representation, each holding left.npy and right.npy.")
    manifest = read_manifest(features_dir)
    if manifest and manifest.get("representations"):
        order = manifest["representations"]
        if isinstance(order, dict):
            order = list(order)
        return [str(name) for name in order]
    names = sorted(
        entry for entry in os.listdir(features_dir)
        if os.path.isfile(os.path.join(features_dir, entry, LEFT_NAME)))
    if not names:
        raise FeatureStoreError(
            f"feature store {features_dir!r} contains no representation: expected "
            f"sub-directories with {LEFT_NAME} and {RIGHT_NAME}.")
    return names


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Validated features of M representations.

    Attributes:
      names: representation names, in run order (bit k of a subset mask is names[k]).
      left: M arrays [N, D_k], float32 or float16.
      right: M arrays [G, D_k].
      manifest: the store's manifest, or None.
      source: where the features came from, for messages.
    """

    names: tuple[str, ...]
    left: tuple[np.ndarray, ...]
    right: tuple[np.ndarray, ...]
    manifest: dict[str, Any] | None = None
    source: str = "<arrays>"

    @property
    def num_queries(self) -> int:
        return int(self.left[0].shape[0])

    @property
    def num_gallery(self) -> int:
        return int(self.right[0].shape[0])


def load_features(
    features_dir: str | os.PathLike[str],
    representations: Sequence[str] | None = None,
) -> FeatureSet:
    """Load and validate the feature store at `features_dir`.

    Args:
      features_dir: the store directory.
      representations: names to load, in this order; None loads all in store order.

    Raises:
      FeatureStoreError: a missing directory or file, an unknown name, or
        invalid arrays (see `validate_features`).
    """
    features_dir = os.fspath(features_dir)
    available = list_representations(features_dir)
    if representations is None:
        names = available
    else:
        names = list(representations)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise FeatureStoreError(
                f"unknown representation(s) {unknown} in {features_dir!r}; "
                f"available: {available}. Fix --representations.")
        if len(set(names)) != len(names):
            raise FeatureStoreError(f"representation names repeat in {names}; list each once.")
    left, right = [], []
    for name in names:
        if not os.path.isdir(os.path.join(features_dir, name)):
            raise FeatureStoreError(
                f"{os.path.join(features_dir, MANIFEST_NAME)} lists representation {name!r}, but "
                f"{os.path.join(features_dir, name)} does not exist. Extract it, or remove {name!r} from the "
                "manifest's representations.")
        left.append(_load_npy(os.path.join(features_dir, name, LEFT_NAME)))
        right.append(_load_npy(os.path.join(features_dir, name, RIGHT_NAME)))
    features = FeatureSet(
        names=tuple(names), left=tuple(left), right=tuple(right),
        manifest=read_manifest(features_dir), source=features_dir)
    validate_features(features)
    return features


def files_fingerprint(features_dir: str | os.PathLike[str], names: Sequence[str]) -> dict[str, Any]:
    """Return the size and SHA-256 of every feature file of `names`, plus the manifest's dataset identity.

    Identifies a run's inputs (checkpoints compare it on resume).
    """
    files = {}
    for name in names:
        for side in (LEFT_NAME, RIGHT_NAME):
            path = os.path.join(os.fspath(features_dir), name, side)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
            files[f"{name}/{side}"] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    manifest = read_manifest(features_dir) or {}
    return {"files": files, "dataset": manifest.get("dataset")}


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FeatureStoreError(
            f"{path} is missing. Each representation directory needs {LEFT_NAME} "
            f"[N, D] and {RIGHT_NAME} [G, D]; re-run the extraction or remove the directory.")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FeatureStoreError(f"{path}: not a readable .npy array ({e}). Re-extract it.") from e


def features_from_arrays(
    names: Sequence[str],
    left: Sequence[np.ndarray],
    right: Sequence[np.ndarray],
) -> FeatureSet:
    """Build and validate a FeatureSet from in-memory arrays (the Python API).

    float64 arrays (numpy's default) are converted to float32, the precision
    the engine computes in; other dtypes than float32 and float16 are rejected.
    """
    def as_supported(array):
        array = np.asarray(array)
        return array.astype(np.float32) if array.dtype == np.float64 else array

    features = FeatureSet(
        names=tuple(str(n) for n in names),
        left=tuple(as_supported(a) for a in left),
        right=tuple(as_supported(a) for a in right))
    validate_features(features)
    return features


def validate_features(features: FeatureSet, *, check_values: bool = True) -> None:
    """Raise FeatureStoreError unless the features form a valid retrieval problem.

    Checks: at least one representation, equal counts of names and arrays,
    2-D float32/float16 arrays, left and right of a representation with the
    same D, G >= N >= 1, the same N and G across representations, and (with
    `check_values`) no NaN or infinite entry and no all-zero row, which would
    leave the cosine similarity undefined.
    """
    names = features.names
    if not names:
        raise FeatureStoreError(f"{features.source}: no representation given.")
    if not (len(names) == len(features.left) == len(features.right)):
        raise FeatureStoreError(
            f"{len(names)} names but {len(features.left)} left and {len(features.right)} right arrays.")
    reference = None
    for name, left, right in zip(names, features.left, features.right):
        where = os.path.join(features.source, name)
        for side, array in (("left", left), ("right", right)):
            if array.ndim != 2:
                raise FeatureStoreError(
                    f"{where}/{side}.npy: expected a 2-D array [rows, D], got shape {array.shape}.")
            if array.dtype not in SUPPORTED_DTYPES:
                raise FeatureStoreError(
                    f"{where}/{side}.npy: dtype {array.dtype} is not supported; "
                    "save float32 or float16 (e.g. array.astype(np.float32)).")
        if left.shape[1] != right.shape[1]:
            raise FeatureStoreError(
                f"{where}: left.npy has D={left.shape[1]} but right.npy has D={right.shape[1]}; "
                "both sides must come from the same extractor.")
        if left.shape[0] < 1:
            raise FeatureStoreError(f"{where}/left.npy has no rows; it needs N >= 1 queries.")
        if right.shape[0] < left.shape[0]:
            raise FeatureStoreError(
                f"{where}: right.npy has G={right.shape[0]} rows, fewer than left.npy's N={left.shape[0]}; "
                "right row i must be the match of left row i, with extra distractors after row N-1.")
        rows = (left.shape[0], right.shape[0])
        if reference is None:
            reference = (name, rows)
        elif rows != reference[1]:
            raise FeatureStoreError(
                f"{where}: (N, G) = {rows} but representation {reference[0]!r} has {reference[1]}; "
                "every representation must be extracted from the same image list.")
        if check_values:
            for side, array in (("left", left), ("right", right)):
                _check_values(f"{where}/{side}.npy", array)


def _check_values(where: str, array: np.ndarray, block_rows: int = 65536) -> None:
    for start in range(0, array.shape[0], block_rows):
        block = np.asarray(array[start:start + block_rows], dtype=np.float32)
        finite = np.isfinite(block)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            raise FeatureStoreError(
                f"{where}: non-finite value {block[row, col]} at row {start + row}, column {col}. "
                "Re-extract the features or drop that image from both sides.")
        zero_rows = np.flatnonzero(~block.any(axis=1))
        if zero_rows.size:
            raise FeatureStoreError(
                f"{where}: row {start + zero_rows[0]} is all zeros ({zero_rows.size} such rows in this "
                "block), so its cosine similarity is undefined. Re-extract it or drop that image.")
