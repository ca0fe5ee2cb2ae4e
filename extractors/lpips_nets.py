"""The LPIPS distance networks: backbone taps, input scaling and calibration weights.

Each net is a torchvision classifier whose `features` activations are read at
the LPIPS taps (all after a ReLU), exactly as the `lpips` package (0.1.4)
slices them. The extractor only returns activations; the channel profile and
every distance are computed by `engine.lpips`.

Backbone weights come from one of three sources:

- "torchvision": the published ImageNet file in torch's hub cache
  (`torch.hub.get_dir()/checkpoints`), downloaded there when allowed;
- a torchvision-format state-dict file (the keys of `torchvision.models.NAME()`),
  loaded strictly;
- "random": a seeded random initialisation, for tests and offline demos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from absl import logging

from engine import store
from extractors import checkpoints

# Per-channel (x - shift) / scale applied to [-1, 1] inputs by LPIPS v0.1; it
# equals ImageNet mean/std normalisation of the [0, 1] image. Version 0.0
# skipped it.
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
VERSIONS = ("0.1", "0.0")


@dataclasses.dataclass(frozen=True)
class LpipsNet:
    """One LPIPS backbone.

    Attributes:
      name: the LPIPS name ("alex", "vgg", "squeeze").
      torchvision_model: the torchvision constructor name.
      taps: `features` indices whose outputs are the LPIPS taps, ascending.
      channels: channel count of each tap, [L].
      weights_enum: the torchvision ImageNet weights, as "Enum.MEMBER".
      tap_names: [L] the names the `lpips` package gives the taps.
    """

    name: str
    torchvision_model: str
    taps: tuple[int, ...]
    channels: tuple[int, ...]
    weights_enum: str
    tap_names: tuple[str, ...]

    @property
    def num_channels(self) -> int:
        return sum(self.channels)

    def weights_url(self) -> str:
        enum_name, member = self.weights_enum.split(".")
        return getattr(torchvision.models, enum_name)[member].url


NETS: dict[str, LpipsNet] = {
    "alex": LpipsNet("alex", "alexnet", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256),
                     "AlexNet_Weights.IMAGENET1K_V1", ("relu1", "relu2", "relu3", "relu4", "relu5")),
    "vgg": LpipsNet("vgg", "vgg16", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512),
                    "VGG16_Weights.IMAGENET1K_V1", ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")),
    "squeeze": LpipsNet("squeeze", "squeezenet1_1", (1, 4, 7, 9, 10, 11, 12),
                        (64, 128, 256, 384, 384, 512, 512), "SqueezeNet1_1_Weights.IMAGENET1K_V1",
                        tuple(f"relu{k}" for k in range(1, 8))),
}


class LpipsWeightsError(checkpoints.CheckpointError):
    """Backbone or calibration weights that are missing or do not fit the net."""


def get_net(name: str) -> LpipsNet:
    """Return the net called `name`; an unknown name raises ValueError listing the valid ones."""
    if name not in NETS:
        raise ValueError(f"unknown LPIPS net {name!r}; valid names: {sorted(NETS)}.")
    return NETS[name]


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"unknown LPIPS version {version!r}; valid versions: {list(VERSIONS)}.")
    return version


def linear_weights_path(net: str, version: str = "0.1") -> str:
    """Return the path of the calibration weights shipped with the `lpips` package."""
    import lpips

    get_net(net)
    check_version(version)
    return os.path.join(os.path.dirname(os.path.abspath(lpips.__file__)), "weights", f"v{version}", f"{net}.pth")


def load_linear_weights(net: str, version: str = "0.1", *, path: str | None = None) -> list[np.ndarray]:
    """Load the LPIPS calibration ("-lin") weights strictly.

    Args:
      net: "alex", "vgg" or "squeeze".
      version: "0.1" (default) or "0.0".
      path: a file in the package's format; default: the file the `lpips` package ships.

    Returns:
      L float32 arrays, tap l of shape [C_l], all >= 0.

    Raises:
      LpipsWeightsError: a missing file, a missing or unexpected key
        `lin{l}.model.1.weight`, a wrong shape, or a negative or non-finite value.
    """
    spec = get_net(net)
    path = path or linear_weights_path(net, version)
    if not os.path.isfile(path):
        raise LpipsWeightsError(
            f"LPIPS calibration weights {path} not found. Install the `lpips` package "
            "(pip install lpips==0.1.4), which ships them.")
    state = checkpoints.load_checkpoint(path)
    if not isinstance(state, dict):
        raise LpipsWeightsError(f"{path}: expected a state dict, got {type(state).__name__}.")
    expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(spec.channels)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LpipsWeightsError(
            f"{path}: calibration weights for {net!r} need exactly the keys {sorted(expected)}; "
            f"missing {missing}, unexpected {unexpected}. Pass the file published for this net.")
    weights = []
    for key, shape in expected.items():
        value = np.asarray(state[key].detach().cpu().numpy() if torch.is_tensor(state[key]) else state[key])
        if value.shape != shape:
            raise LpipsWeightsError(f"{path}: {key} has shape {value.shape}, expected {shape} for {net!r}.")
        if not np.all(np.isfinite(value)) or (value < 0).any():
            raise LpipsWeightsError(
                f"{path}: {key} contains negative or non-finite values, but LPIPS calibration weights are "
                "finite and >= 0. Pass the file the lpips package ships.")
        weights.append(value.reshape(-1).astype(np.float32))
    return weights


@dataclasses.dataclass(frozen=True)
class BackboneSource:
    """The source of a backbone's weights.

    Attributes:
      kind: "torchvision", "file" or "random".
      path: the state-dict file for "torchvision" and "file".
      seed: the initialisation seed for "random".
      fingerprint: identifies the weights in cache keys (file name and size
        for the torchvision file whose name carries its hash, SHA-256 of a
        user file, the seed and torch version for random weights).
    """

    kind: str
    path: str | None = None
    seed: int | None = None
    fingerprint: str = ""

    def describe(self) -> str:
        if self.kind == "random":
            return f"RANDOM weights (seed {self.seed}); distances are not LPIPS"
        return f"{self.kind} weights from {self.path}"


def torchvision_cache_path(net: str) -> str:
    """Return where torchvision keeps (or would download) the net's ImageNet weights."""
    url = get_net(net).weights_url()
    return os.path.join(checkpoints.hub_checkpoint_dir(), os.path.basename(url))


def resolve_backbone(
    net: str,
    *,
    weights_path: str | None = None,
    random_seed: int | None = None,
    allow_download: bool = False,
    fallback_to_random: bool = False,
) -> BackboneSource:
    """Decide where the backbone weights of `net` come from.

    Order: an explicit `weights_path`; seeded random weights when `random_seed`
    is given; the torchvision file in torch's hub cache; a download when
    `allow_download`; seeded random weights (seed 0) when `fallback_to_random`,
    with a warning in the log.

    Raises:
      LpipsWeightsError: no source is available; the message gives the URL
        and the places the file may go.
    """
    spec = get_net(net)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise LpipsWeightsError(
                f"backbone weights file {weights_path} for {net!r} not found. Pass a torchvision-format "
                f"state dict of torchvision.models.{spec.torchvision_model}, e.g. the file from "
                f"{spec.weights_url()}.")
        return BackboneSource("file", path=os.path.abspath(weights_path), fingerprint=_sha256_file(weights_path))
    if random_seed is not None:
        return _random_source(random_seed)
    cached = torchvision_cache_path(net)
    if not os.path.isfile(cached) and allow_download:
        logging.info("downloading %s weights from %s", net, spec.weights_url())
        torch.hub.load_state_dict_from_url(spec.weights_url(), map_location="cpu", check_hash=True)
    if os.path.isfile(cached):
        return BackboneSource("torchvision", path=cached,
                              fingerprint=f"{os.path.basename(cached)}:{os.path.getsize(cached)}")
    if fallback_to_random:
        logging.warning(
            "NO PRETRAINED WEIGHTS for %s: %s is missing, so the backbone is RANDOM (seed 0). "
            "Distances and scores from it are not LPIPS. Put %s in %s to use the real weights.",
            net, cached, spec.weights_url(), checkpoints.hub_checkpoint_dir())
        return _random_source(0)
    raise LpipsWeightsError(
        f"ImageNet weights for {net!r} not found at {cached}. Download {spec.weights_url()} into "
        f"{checkpoints.hub_checkpoint_dir()}, or pass --backbone_weights={net}=PATH with a "
        "torchvision-format state dict.")


def _random_source(seed: int) -> BackboneSource:
    return BackboneSource("random", seed=int(seed), fingerprint=f"random:{seed}:torch-{torch.__version__}")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def build_features(net: str, source: BackboneSource, *, trust: bool = False) -> torch.nn.Module:
    """Return the torchvision `features` trunk of `net` with the weights of `source`, in eval mode.

    A weights file may hold the whole classifier (every key of
    `torchvision.models.NAME().state_dict()`) or only its `features.*` keys;
    either way every key and shape must match.

    Raises:
      LpipsWeightsError: the file's keys or shapes do not match.
    """
    spec = get_net(net)
    constructor = getattr(torchvision.models, spec.torchvision_model)
    if source.kind == "random":
        torch.manual_seed(source.seed)
        return constructor(weights=None).features.eval()

    state = checkpoints.load_checkpoint(source.path, trust=trust)
    if not isinstance(state, dict):
        raise LpipsWeightsError(f"{source.path}: expected a state dict, got {type(state).__name__}.")
    state = checkpoints.as_tensor_state_dict(state, source=source.path)

    # Built on the meta device (no random initialisation, which takes seconds
    # for VGG16), then given real storage that the strict load fills.
    with torch.device("meta"):
        model = constructor(weights=None)
    features_only = all(key.startswith("features.") for key in state)
    target = model.features if features_only else model
    if features_only:
        state = checkpoints.select_prefix(state, "features.")
    target.to_empty(device="cpu")
    try:
        checkpoints.load_state_dict_strict(target, state, source=source.path)
    except checkpoints.CheckpointError as e:
        raise LpipsWeightsError(
            f"{e} The backbone weights for {net!r} must be a torchvision-format state dict of "
            f"torchvision.models.{spec.torchvision_model} (e.g. {spec.weights_url()}).") from e
    return model.features.eval()


class TapExtractor(torch.nn.Module):
    """The `features` trunk of an LPIPS net up to its last tap, with the LPIPS input scaling.

    `forward` takes RGB images [B, 3, H, W] in [-1, 1] and returns the L tap
    activations [B, C_l, H_l, W_l].
    """

    def __init__(self, spec: LpipsNet, features: torch.nn.Module, version: str):
        super().__init__()
        self.spec = spec
        self.version = check_version(version)
        self.trunk = torch.nn.ModuleList(list(features)[: spec.taps[-1] + 1])
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT, dtype=torch.float32)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(INPUT_SCALE, dtype=torch.float32)[None, :, None, None])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = (images - self.shift) / self.scale if self.version == "0.1" else images
        taps = set(self.spec.taps)
        outputs = []
        for index, module in enumerate(self.trunk):
            h = module(h)
            if index in taps:
                outputs.append(h)
        return outputs


def build_tap_extractor(
    net: str,
    source: BackboneSource,
    *,
    version: str = "0.1",
    device: str = "cpu",
    trust: bool = False,
) -> TapExtractor:
    """Build the tap extractor of `net` (eval mode, no gradients) on `device`."""
    spec = get_net(net)
    extractor = TapExtractor(spec, build_features(net, source, trust=trust), version).to(device).eval()
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    logging.info("LPIPS %s v%s: %s", net, version, source.describe())
    return extractor


@torch.inference_mode()
def extract_taps(extractor: TapExtractor, images: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Return the tap activations of `images` as float32 numpy arrays.

    Args:
      extractor: from `build_tap_extractor`.
      images: [B, H, W, 3] (numpy, channels last) or [B, 3, H, W] (tensor), in [-1, 1].

    Returns:
      L arrays [B, C_l, H_l, W_l].
    """
    device = next(extractor.buffers()).device
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    images = images.to(device=device, dtype=torch.float32)
    return [tap.float().cpu().numpy() for tap in extractor(images)]


def parse_backbone_weights(text: str, nets: Sequence[str]) -> dict[str, str]:
    """Parse "alex=PATH,vgg=PATH" into {net: path}, checking the names against `nets`."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--backbone_weights item {item!r} is not NET=PATH, e.g. alex=/weights/alexnet.pth.")
        get_net(name)
        if name not in nets:
            raise ValueError(f"--backbone_weights names {name!r}, which is not in --nets {list(nets)}.")
        parsed[name] = path
    return parsed


def net_runner(
    net: str,
    source: BackboneSource,
    *,
    version: str = "0.1",
    device: str = "cpu",
    trust: bool = False,
):
    """Return an `engine.bapps_pipeline.NetRunner` whose extractor is built on first use."""
    from engine import bapps_pipeline

    spec = get_net(net)
    check_version(version)
    fingerprint = {"net": net, "torchvision_model": spec.torchvision_model, "taps": list(spec.taps),
                   "channels": list(spec.channels), "version": version, "backbone": source.fingerprint}

    def make_extract():
        extractor = build_tap_extractor(net, source, version=version, device=device, trust=trust)
        return lambda images: extract_taps(extractor, images)

    return bapps_pipeline.NetRunner(net, spec.channels, fingerprint, make_extract)


def write_random_backbone(net: str, path: str, *, seed: int) -> str:
    """Write seeded random `features.*` weights of `net` as a torchvision-format state dict; return `path`.

    Only the trunk is written: LPIPS does not use the classifier, which for
    VGG16 would add about 400 MB.
    """
    spec = get_net(net)
    torch.manual_seed(seed)
    features = getattr(torchvision.models, spec.torchvision_model)(weights=None).features
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    with store.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_backbone_into_package(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load a torchvision-format backbone file strictly into an `lpips.LPIPS` model's trunk; return the model.

    The package's trunk slices name their modules by torchvision `features`
    index, so key `slice{k}.{index}.{name}` takes `features.{index}.{name}`.
    """
    state = checkpoints.load_checkpoint(path)
    target = model.net.state_dict()
    mapped = {}
    for key in target:
        _, index, rest = key.split(".", 2)
        source_key = f"features.{index}.{rest}"
        if source_key not in state:
            raise LpipsWeightsError(f"{path}: key {source_key!r} is missing; pass a torchvision-format state dict.")
        mapped[key] = state[source_key]
    model.net.load_state_dict(mapped, strict=True)
    return model
