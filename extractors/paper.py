"""The eleven representations of Rosenfeld, Zemel and Tsotsos (arXiv:1903.10920).

Every entry is in the group "paper" and loads its published checkpoint. The
entries are conv (DenseNet-121, ImageNet), ret and ret_w (ResNet-101 GeM
fine-tuned on retrieval-SfM-120k, without and with its learned whitening),
shp (EdgeMAC), weaka (weakalign's ResNet-101), pl18 and pl50 (Places365),
pose (the OpenPose trunk), and texture, texture_SI and texture_SII
(Stylized-ImageNet ResNet-50s).
Settings the paper leaves open have variants in the group "paper_variants"
(multi-scale ret and ret_w, conv pooled after the final ReLU, weaka without
per-position normalisation, multi-scale mirrored shp).

Weights are looked up under their published file names in --weights_dir and
then in torch's hub cache. Loading never runs code from a file, and it is
strict. Keys a representation does not use (classifier heads, the pose
stages, the alignment regressors) are listed exactly and must be present.
Every other key must match the architecture.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from absl import logging
from PIL import Image
from torch import nn
from torch.nn import functional as F

from extractors import paper_models
from extractors.checkpoints import (
    BATCHNORM_COUNTER,
    CheckpointError,
    MissingWeightsError,
    as_tensor_state_dict,
    find_or_download_weights,
    find_weights,
    load_checkpoint,
    load_state_dict_strict,
    strip_prefix,
)
from extractors.matconvnet import DagNetwork, conv_filter_to_torch, read_dagnn
from extractors.preprocess import input_transform
from extractors.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BuildOptions,
    InputSpec,
    Representation,
    WeightsSource,
    register,
)

GROUP = "paper"
VARIANTS_GROUP = "paper_variants"

# Items of a batch: one input tensor, or a tuple of views (scales, mirror
# images) whose descriptors are aggregated into one row.
Item = torch.Tensor | tuple[torch.Tensor, ...]


class PaperExtractor:
    """A loaded network with its preprocessing and pooling.

    Attributes:
      representation: the entry as built; settings resolved at build time
        (e.g. shp's edge detector) are in its config.
      network: the torch module, in eval mode on the requested device.
    """

    def __init__(
        self,
        representation: Representation,
        network: nn.Module,
        *,
        transform: Callable[[Image.Image], Item],
        forward: Callable[[torch.Tensor], torch.Tensor],
        device: str,
        aggregate: Callable[[torch.Tensor], torch.Tensor] | None = None,
        postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.representation = representation
        self.network = network.to(device).eval()
        self._transform = transform
        self._forward = forward
        self._device = device
        self._aggregate = aggregate
        self._postprocess = postprocess

    def preprocess(self, image: Image.Image) -> Item:
        """Turn one RGB PIL image into this network's input (a tensor, or a tuple of views)."""
        return self._transform(image)

    def embed(self, batch: torch.Tensor | Sequence[Item]) -> np.ndarray:
        """Return float32 features [B, D] for a stacked tensor or a list of preprocessed items.

        Items of different sizes are grouped by shape, each group runs as one
        batch, and rows come back in input order.
        """
        items = list(batch) if not isinstance(batch, torch.Tensor) else None
        if items == []:
            return np.zeros((0, self.representation.output_dim), dtype=np.float32)
        with torch.inference_mode():
            if items is None:
                features = self._forward(batch.to(self._device))
            else:
                features = self._embed_items(items)
            if self._postprocess is not None:
                features = self._postprocess(features)
        return features.float().cpu().numpy()

    def _embed_items(self, items: list[Item]) -> torch.Tensor:
        # Flatten every item into its views, remembering the item each view belongs to.
        views: list[torch.Tensor] = []
        owners: list[int] = []
        for index, item in enumerate(items):
            item_views = item if isinstance(item, tuple) else (item,)
            views.extend(item_views)
            owners.extend([index] * len(item_views))

        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, view in enumerate(views):
            by_shape.setdefault(tuple(view.shape), []).append(index)
        descriptors: list[torch.Tensor] = [torch.empty(0)] * len(views)
        for indices in by_shape.values():
            stacked = torch.stack([views[i] for i in indices]).to(self._device)
            for i, row in zip(indices, self._forward(stacked)):
                descriptors[i] = row

        rows = []
        for index, item in enumerate(items):
            own = torch.stack([d for d, owner in zip(descriptors, owners) if owner == index])
            if isinstance(item, tuple) and self._aggregate is not None:
                rows.append(self._aggregate(own))
            else:
                rows.append(own[0])
        return torch.stack(rows)


# ---------------------------------------------------------------------------
# Loading helpers shared by the builders.


def _load_container(representation: Representation, options: BuildOptions, *, download: bool = False) -> tuple[str, Any]:
    find = find_or_download_weights if download else find_weights
    path = find(representation.weights, options.weights_dir, representation=representation.name)
    # latin1: the 2017-2018 files may be Python 2 pickles, whose byte strings
    # only decode this way; it changes nothing for Python 3 files.
    return path, load_checkpoint(path, trust=options.trust_checkpoints, latin1=True)


def _field(container: Any, key: str, path: str) -> Any:
    if not isinstance(container, Mapping) or key not in container:
        found = sorted(container) if isinstance(container, Mapping) else type(container).__name__
        raise CheckpointError(f"{path}: expected a checkpoint dict with key {key!r}, found {found}.")
    return container[key]


def _check_arch(container: Mapping[str, Any], expected: str, path: str) -> None:
    arch = container.get("arch")
    if arch is not None and arch != expected:
        raise CheckpointError(f"{path}: the file is for architecture {arch!r}, this representation needs {expected!r}.")


def _float32(state_dict: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    tensors = as_tensor_state_dict(state_dict, source=path)
    return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}


def _load_into(module: nn.Module, state_dict: Mapping[str, Any], path: str, *, ignore: Sequence[str] = ()) -> None:
    load_state_dict_strict(module, _float32(state_dict, path), source=path, ignore=ignore,
                           optional_suffixes=(BATCHNORM_COUNTER,), assign=True)
    unloaded = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if unloaded:
        raise CheckpointError(f"{path}: no weights were loaded for {unloaded}.")


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    # Building on the meta device skips random initialisation; the weights
    # arrive with load_state_dict(assign=True).
    with torch.device("meta"):
        return factory()


def _classifier_keys(prefix: str = "fc") -> tuple[str, str]:
    return (f"{prefix}.weight", f"{prefix}.bias")


def _config(representation: Representation, key: str) -> Any:
    return dict(representation.config)[key]


def _image_net_spec(**overrides: Any) -> InputSpec:
    return dataclasses.replace(InputSpec(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD), **overrides)


# ---------------------------------------------------------------------------
# conv: DenseNet-121.

# torchvision's DenseNet files predate the rule against dots in module names
# and store e.g. "denselayer1.norm.1.weight" for "denselayer1.norm1.weight".
_DENSENET_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def rename_legacy_densenet_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map torchvision's published DenseNet keys ("norm.1") to the module's names ("norm1")."""
    renamed = {}
    for key, value in state_dict.items():
        match = _DENSENET_LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _build_conv(representation: Representation, options: BuildOptions) -> PaperExtractor:
    path, state = _load_container(representation, options, download=True)
    network = _on_meta(lambda: torchvision.models.densenet121(weights=None))
    network.classifier = nn.Identity()
    _load_into(network, rename_legacy_densenet_keys(state), path, ignore=_classifier_keys("classifier"))

    after_relu = _config(representation, "pool_after_relu")

    def forward(x: torch.Tensor) -> torch.Tensor:
        features = network.features(x)
        if after_relu:
            features = F.relu(features)
        return paper_models.average_pool(features)

    return PaperExtractor(representation, network, transform=input_transform(representation.input_spec),
                          forward=forward, device=options.device)


# ---------------------------------------------------------------------------
# ret and ret_w: ResNet-101 GeM, retrieval-SfM-120k.

RETRIEVAL_DATASET = "retrieval-SfM-120k"
MULTISCALE = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def _build_retrieval(representation: Representation, options: BuildOptions) -> PaperExtractor:
    path, container = _load_container(representation, options)
    meta = _field(container, "meta", path)
    for key, expected in (("architecture", "resnet101"), ("pooling", "gem")):
        if key in meta and meta[key] != expected:
            raise CheckpointError(f"{path}: meta[{key!r}] is {meta[key]!r}, this representation needs {expected!r}.")
    _check_normalisation(meta, representation.input_spec, path)

    network = _on_meta(lambda: paper_models.RetrievalNet("resnet101"))
    _load_into(network, _field(container, "state_dict", path), path)
    logging.info("%s: GeM exponent p = %.4f from %s", representation.name, network.pool.p.item(), path)

    scales = tuple(_config(representation, "scales"))
    whitening = _config(representation, "whitening")
    postprocess = None
    if whitening:
        m, projection = _whitening(meta, whitening, path, dim=representation.output_dim)

        def postprocess(x: torch.Tensor) -> torch.Tensor:
            return whiten(x, m.to(x.device), projection.to(x.device))

    base = input_transform(representation.input_spec)

    def transform(image: Image.Image) -> Item:
        x = base(image)
        if scales == (1.0,):
            return x
        return tuple(_rescale(x, s) for s in scales)

    p = network.pool.p.detach()

    def aggregate(views: torch.Tensor) -> torch.Tensor:
        # cnnimageretrieval-pytorch's extract_ms: mean of v^p over scales, ^(1/p), L2 without epsilon.
        v = views.pow(p.to(views.device)).mean(dim=0).pow(1.0 / p.to(views.device))
        return v / v.norm()

    return PaperExtractor(representation, network, transform=transform, forward=network, device=options.device,
                          aggregate=aggregate, postprocess=postprocess)


def _rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    return F.interpolate(x[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]


def _check_normalisation(meta: Mapping[str, Any], spec: InputSpec, path: str) -> None:
    for key, expected in (("mean", spec.mean), ("std", spec.std)):
        if key in meta and not np.allclose(np.asarray(meta[key], dtype=np.float64), expected, atol=1e-4):
            raise CheckpointError(
                f"{path}: meta[{key!r}] is {list(meta[key])}, but this representation normalises with {list(expected)}.")


def _whitening(meta: Mapping[str, Any], mode: str, path: str, *, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        learned = meta["Lw"][RETRIEVAL_DATASET][mode]
        m, projection = np.asarray(learned["m"], dtype=np.float32), np.asarray(learned["P"], dtype=np.float32)
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: no learned whitening meta['Lw'][{RETRIEVAL_DATASET!r}][{mode!r}] with keys 'm' and 'P' "
            f"({type(e).__name__}: {e}). The ret_w entries need the published file, which includes it.") from e
    if projection.ndim != 2 or m.size != dim or projection.shape != (dim, dim):
        raise CheckpointError(
            f"{path}: whitening shapes do not fit: m {m.shape}, P {projection.shape}; expected m [{dim}, 1] and "
            f"P [{dim}, {dim}].")
    return torch.from_numpy(m.reshape(-1)), torch.from_numpy(projection)


def whiten(x: torch.Tensor, m: torch.Tensor, projection: torch.Tensor, eps: float = paper_models.L2_EPS) -> torch.Tensor:
    """Apply learned whitening to descriptors [B, D]: P (x − m), then L2 (ε added to the norm)."""
    return paper_models.l2_normalize((x - m) @ projection.T, eps)


# ---------------------------------------------------------------------------
# weaka: weakalign's ResNet-101 trunk.

def _weakalign_regression_keys(prefix: str) -> list[str]:
    # FeatureRegression: Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU, then `linear`.
    keys = [f"{prefix}.conv.{i}.{name}" for i in (0, 3) for name in ("weight", "bias")]
    keys += [f"{prefix}.conv.{i}.{name}" for i in (1, 4) for name in ("weight", "bias", "running_mean", "running_var")]
    return keys + [f"{prefix}.linear.weight", f"{prefix}.linear.bias"]


def _build_weakalign(representation: Representation, options: BuildOptions) -> PaperExtractor:
    path, container = _load_container(representation, options)
    state = _field(container, "state_dict", path)
    # Older files name the backbone "vgg" whatever its architecture.
    state = {re.sub(r"^FeatureExtraction\.vgg\.", "FeatureExtraction.model.", k): v for k, v in state.items()}

    trunk = _on_meta(lambda: paper_models.resnet_trunk("resnet101", "layer3"))
    wrapper = nn.ModuleDict({"FeatureExtraction": nn.ModuleDict({"model": trunk})})
    ignore = [k for prefix in ("FeatureRegression", "FeatureRegression2") for k in _weakalign_regression_keys(prefix)]
    ignore += [k for k in state if k.startswith(("FeatureRegression.", "FeatureRegression2.")) and k.endswith(BATCHNORM_COUNTER)]
    _load_into(wrapper, state, path, ignore=ignore)

    normalize_positions = _config(representation, "normalize_positions")

    def forward(x: torch.Tensor) -> torch.Tensor:
        features = trunk(x)
        if normalize_positions:
            # weakalign's featureL2Norm: each position divided by sqrt(sum of squares + 1e-6).
            features = features / torch.sqrt(features.pow(2).sum(dim=1, keepdim=True) + 1e-6)
        return paper_models.average_pool(features)

    return PaperExtractor(representation, trunk, transform=input_transform(representation.input_spec),
                          forward=forward, device=options.device)


# ---------------------------------------------------------------------------
# pl18, pl50, texture, texture_SI, texture_SII: classification ResNets.

def _build_classification_resnet(representation: Representation, options: BuildOptions) -> PaperExtractor:
    arch, num_classes = _config(representation, "arch"), _config(representation, "num_classes")
    path, container = _load_container(representation, options)
    _check_arch(container, arch, path)
    state = _field(container, "state_dict", path)
    unprefixed = [k for k in state if not k.startswith("module.")]
    if unprefixed:
        raise CheckpointError(f"{path}: expected every key to start with 'module.' (a DataParallel state dict), "
                              f"found {unprefixed[:3]}; check that the file is the published one.")

    network = _on_meta(lambda: paper_models.classification_resnet(arch, num_classes))
    classifier_shape = tuple(network.fc.weight.shape)
    network.fc = nn.Identity()
    state = strip_prefix(state, "module.")
    head = state.get("fc.weight")
    if head is not None and tuple(head.shape) != classifier_shape:
        raise CheckpointError(f"{path}: fc.weight has shape {tuple(head.shape)}, expected {classifier_shape} "
                              f"({num_classes} classes); check that the file is the published {arch}.")
    _load_into(network, state, path, ignore=_classifier_keys())
    return PaperExtractor(representation, network, transform=input_transform(representation.input_spec),
                          forward=network, device=options.device)


# ---------------------------------------------------------------------------
# pose: the OpenPose trunk.

def _build_pose(representation: Representation, options: BuildOptions) -> PaperExtractor:
    path, container = _load_container(representation, options)
    state = _field(container, "state_dict", path)
    trunk = _on_meta(paper_models.openpose_trunk)
    _load_into(nn.ModuleDict({"model0": trunk}), state, path, ignore=paper_models.openpose_stage_keys())
    return PaperExtractor(representation, trunk, transform=input_transform(representation.input_spec),
                          forward=lambda x: paper_models.average_pool(trunk(x)), device=options.device)


# ---------------------------------------------------------------------------
# shp: EdgeMAC.

EDGE_PADDING = 30
STRUCTURED_EDGE_MODEL = WeightsSource(
    file_name="model.yml.gz",
    url="https://github.com/opencv/opencv_extra/raw/4.x/testdata/cv/ximgproc/model.yml.gz",
    license="BSD-3-Clause (OpenCV)",
    notes="Dollár and Zitnick's structured-forest edge model for cv2.ximgproc.createStructuredEdgeDetection.")
_EDGE_FILTER_PARAMS = ("w", "p", "s", "t")


def edgemac_state_dict(network: DagNetwork) -> dict[str, torch.Tensor]:
    """Map a MatConvNet EdgeMAC DagNN to `paper_models.EdgeMAC` keys, checking its structure.

    The path from the input must be: EdgeFilter; VGG16's 13 convolutions, each
    followed by ReLU, with a 2×2 max pool after blocks 1-4; MAC. Layers off
    that path may only be parameter-free (L2 normalisation, losses). Every
    parameter must belong to a layer on the path.

    Raises:
      CheckpointError: naming the layer or parameter that does not fit.
    """
    path = network.path
    chain = network.chain_from_input()
    expected_kinds = ["EdgeFilter"]
    for item in paper_models.VGG16_CONVS:
        expected_kinds += ["Pooling"] if item == "M" else ["Conv", "ReLU"]
    expected_kinds.append("MAC")
    kinds = [layer.kind for layer in chain[: len(expected_kinds)]]
    if kinds != expected_kinds:
        raise CheckpointError(
            f"{path}: the layers from the input are {[f'{l.name} ({l.kind})' for l in chain]}; EdgeMAC needs "
            f"the kinds {expected_kinds}.")
    on_path = {layer.name for layer in chain[: len(expected_kinds)]}
    for layer in network.layers:
        if layer.name not in on_path and layer.params:
            raise CheckpointError(f"{path}: unexpected layer {layer.name!r} ({layer.kind}) with parameters {list(layer.params)}.")

    used: list[str] = []

    def param(layer: Any, index: int) -> np.ndarray:
        if index >= len(layer.params) or layer.params[index] not in network.params:
            raise CheckpointError(f"{path}: layer {layer.name!r} is missing parameter {index + 1} "
                                  f"(it names {list(layer.params)}).")
        used.append(layer.params[index])
        return network.params[layer.params[index]]

    state: dict[str, torch.Tensor] = {}
    edge_layer = chain[0]
    for index, name in enumerate(_EDGE_FILTER_PARAMS):
        value = np.asarray(param(edge_layer, index), dtype=np.float32)
        if value.size != 1:
            raise CheckpointError(f"{path}: edge filter parameter {edge_layer.params[index]!r} has shape {value.shape}, expected a scalar.")
        state[f"edge_filter.{name}"] = torch.tensor(float(value.reshape(-1)[0]))

    convs = [layer for layer in chain if layer.kind == "Conv"]
    model_keys = paper_models.EdgeMAC.conv_key_names()
    for layer, (weight_key, bias_key) in zip(convs, model_keys):
        _check_block(layer, path)
        state[weight_key] = torch.from_numpy(conv_filter_to_torch(param(layer, 0)))
        state[bias_key] = torch.from_numpy(np.asarray(param(layer, 1), dtype=np.float32).reshape(-1))
    for layer in chain:
        if layer.kind == "Pooling":
            _check_pooling(layer, path)

    unused = sorted(set(network.params) - set(used))
    if unused:
        raise CheckpointError(f"{path}: unexpected parameters {unused} that no EdgeMAC layer uses.")
    return state


def _check_block(layer: Any, path: str) -> None:
    pad, stride = layer.block.get("pad", [1]), layer.block.get("stride", [1])
    if set(np.ravel(pad)) != {1} or set(np.ravel(stride)) != {1}:
        raise CheckpointError(f"{path}: convolution {layer.name!r} has pad {pad} and stride {stride}; VGG16 uses 1 and 1.")


def _check_pooling(layer: Any, path: str) -> None:
    block = layer.block
    if (block.get("method", "max") != "max" or set(np.ravel(block.get("poolSize", [2]))) != {2}
            or set(np.ravel(block.get("stride", [2]))) != {2} or set(np.ravel(block.get("pad", [0]))) != {0}):
        raise CheckpointError(f"{path}: pooling {layer.name!r} is {block}; VGG16 uses 2×2 max pooling with stride 2.")


EdgeDetector = Callable[[np.ndarray], np.ndarray]


def edge_detector(options: BuildOptions) -> tuple[str, EdgeDetector]:
    """Return (name, detector) of the edge detector shp uses on this machine.

    The detector maps an RGB float32 image [H, W, 3] in [0, 1] to edges
    [H, W] in [0, 1]. "structured_forest" is OpenCV contrib's
    implementation of Dollár and Zitnick's detector, which EdgeMAC was
    trained with. It needs `cv2.ximgproc` and the model file `model.yml.gz`
    in --weights_dir or torch's hub cache. Otherwise the substitute
    "sobel_max_rgb" is the Sobel gradient magnitude of each colour channel
    (scikit-image), the maximum over channels, clipped to [0, 1].
    """
    try:
        import cv2  # noqa: PLC0415  (optional dependency)

        create = cv2.ximgproc.createStructuredEdgeDetection
        model_path = find_weights(STRUCTURED_EDGE_MODEL, options.weights_dir, representation="shp edge model")
    except (ImportError, AttributeError, MissingWeightsError) as e:
        logging.warning("shp: structured-forest edges unavailable (%s); using the Sobel substitute, "
                        "so features differ from the published EdgeMAC's.", e)
        return "sobel_max_rgb", sobel_edges
    detector = create(model_path)
    return "structured_forest", lambda image: np.asarray(detector.detectEdges(np.ascontiguousarray(image)), np.float32)


def sobel_edges(image: np.ndarray) -> np.ndarray:
    """Sobel magnitude per channel of an RGB image [H, W, 3] in [0, 1], maximum over channels, clipped to [0, 1]."""
    from skimage.filters import sobel  # noqa: PLC0415  (scikit-image is slow to import)

    magnitude = np.max(np.stack([sobel(image[..., c]) for c in range(image.shape[-1])]), axis=0)
    return np.clip(magnitude, 0.0, 1.0).astype(np.float32)


def _resize_longer(image: Image.Image, longer: int | float) -> Image.Image:
    width, height = image.size
    scale = longer / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)


def _build_edgemac(representation: Representation, options: BuildOptions) -> PaperExtractor:
    path = find_weights(representation.weights, options.weights_dir, representation=representation.name)
    network = _on_meta(paper_models.EdgeMAC)
    load_state_dict_strict(network, edgemac_state_dict(read_dagnn(path)), source=path, assign=True)
    logging.info("shp: edge filter p = %.4f, t = %.4f from %s", network.edge_filter.p.item(), network.edge_filter.t.item(), path)

    detector_name, detect = edge_detector(options)
    built = dataclasses.replace(representation, config=tuple(
        (k, detector_name if k == "edge_detector" else v) for k, v in representation.config))
    scales = tuple(_config(representation, "scales"))
    mirror = _config(representation, "mirror")
    longer_side = _config(representation, "longer_side")

    def transform(image: Image.Image) -> Item:
        image = _resize_longer(image.convert("RGB"), longer_side)
        views = []
        for scale in scales:
            scaled = image if scale == 1.0 else _resize_longer(image, max(image.size) * scale)
            for flip in ((False, True) if mirror else (False,)):
                view = scaled.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else scaled
                edges = detect(np.asarray(view, dtype=np.float32) / 255.0)
                edges = np.pad(edges, EDGE_PADDING, mode="constant")
                views.append(torch.from_numpy(edges)[None])
        return tuple(views)

    def aggregate(views: torch.Tensor) -> torch.Tensor:
        # The EdgeMAC authors sum the views' L2-normalised descriptors, then L2-normalise.
        total = views.sum(dim=0)
        return total / total.norm().clamp(min=1e-12)

    return PaperExtractor(built, network, transform=transform, forward=network, device=options.device,
                          aggregate=aggregate)


# ---------------------------------------------------------------------------
# Registry entries.

_TEXTURE_BASE = "https://bitbucket.org/robert_geirhos/texture-vs-shape-pretrained-models/raw"
_PLACES_BASE = "http://places2.csail.mit.edu/models_places365"
_RETRIEVAL_URL = ("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/"
                  "retrievalSfM120k-resnet101-gem-b80fb85.pth")
_EDGEMAC_URL = ("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-30k/"
                "retrievalSfM30k-edgemac-vgg.mat")
_RETRIEVAL_SPEC = InputSpec(resize=1024, resize_side="longer", upscale=False, crop=None,
                            interpolation="lanczos")


def _retrieval_entry(name: str, *, whitening: str | None, scales: tuple[float, ...], groups: tuple[str, ...]) -> Representation:
    mode = "multi-scale (1, 1/√2, 1/2; GeM-style power mean with the learned p)" if len(scales) > 1 else "single-scale"
    whitened = (f" then the learned whitening meta['Lw']['{RETRIEVAL_DATASET}']['{whitening}'] from the file, "
                "P (x − m), and L2 normalisation" if whitening else "")
    return Representation(
        name=name,
        description=f"ResNet-101 GeM fine-tuned on {RETRIEVAL_DATASET}{', whitened' if whitening else ''}, {mode}.",
        output_dim=2048,
        input_spec=_RETRIEVAL_SPEC,
        weights=WeightsSource(file_name="retrievalSfM120k-resnet101-gem-b80fb85.pth", url=_RETRIEVAL_URL,
                              license="MIT (cnnimageretrieval-pytorch)",
                              notes="dict with state_dict and meta; meta['Lw'] contains the learned whitening."),
        layer="layer4",
        pooling="gem" + ("+whitening" if whitening else ""),
        builder=_build_retrieval,
        groups=groups,
        provenance=(
            f"cnnimageretrieval-pytorch descriptor: GeM with the file's learned p, L2 (ε 1e-6){whitened}. "
            "Input: the whole image, shrunk (Lanczos, as PIL's thumbnail) so the longer side is at most 1024, no "
            f"crop, ImageNet mean and std; {mode}. Unconfirmed whether the paper extracted single- or "
            "multi-scale; the 'paper' entries are single-scale, the '_ms' variants multi-scale. Inputs differ in "
            "size, so pass lists to embed(); same-size images still run as one batch."),
        config=(("whitening", whitening), ("scales", scales), ("variable_input_size", True)),
    )


def _classification_entry(name: str, description: str, *, arch: str, num_classes: int, dim: int,
                          weights: WeightsSource, spec: InputSpec, provenance: str) -> Representation:
    return Representation(
        name=name, description=description, output_dim=dim, input_spec=spec, weights=weights,
        layer="avgpool", pooling="avg", builder=_build_classification_resnet, groups=(GROUP,),
        provenance=provenance + " Feature: the average-pool output (the classifier's input); fc.* is ignored.",
        config=(("arch", arch), ("num_classes", num_classes)))


def _conv_entry(name: str, *, after_relu: bool, groups: tuple[str, ...]) -> Representation:
    return Representation(
        name=name,
        description="DenseNet-121, ImageNet (torchvision), average-pooled "
                    + ("after" if after_relu else "before") + " the final ReLU.",
        output_dim=1024,
        input_spec=_image_net_spec(),
        weights=WeightsSource(file_name="densenet121-a639ec97.pth",
                              url="https://download.pytorch.org/models/densenet121-a639ec97.pth",
                              license="BSD-3-Clause (torchvision)", torchvision="DenseNet121_Weights.IMAGENET1K_V1"),
        layer="features" + (" + relu" if after_relu else " (norm5, before the final ReLU)"),
        pooling="avg",
        builder=_build_conv,
        groups=groups,
        provenance=(
            "Pooling variant: " + ("after the final ReLU, as torchvision's forward does. " if after_relu else
            "the output of `features` (norm5) average-pooled before the final ReLU, as the Totally-Looks-Like "
            "authors' baseline code does; the paper shares its first author with that work and reports conv as "
            "the TLL baseline, so this is the more likely variant, but it is unconfirmed (conv_relu is the other). ")
            + "Resize 256, centre crop 224, ImageNet mean and std. Downloads into torch's hub cache when online."),
        config=(("pool_after_relu", after_relu),),
    )


def _weaka_entry(name: str, *, normalize_positions: bool, groups: tuple[str, ...]) -> Representation:
    return Representation(
        name=name,
        description="weakalign ResNet-101 trunk up to layer3, globally average-pooled"
                    + (" after per-position L2 normalisation." if normalize_positions else " (raw activations)."),
        output_dim=1024,
        input_spec=_image_net_spec(),
        weights=WeightsSource(
            file_name="weakalign_resnet101_affine_tps.pth.tar",
            url="http://www.di.ens.fr/willow/research/weakalign/trained_models/weakalign_resnet101_affine_tps.pth.tar",
            license="MIT (weakalign)", notes="dict with state_dict, epoch, args (argparse.Namespace), optimizer."),
        layer="FeatureExtraction.model (layer3)",
        pooling="avg",
        builder=_build_weakalign,
        groups=groups,
        provenance=(
            "Keys FeatureExtraction.model.* (older files: .vgg.*); the two FeatureRegression heads are ignored. "
            + ("Each position is L2-normalised first, as weakalign's FeatureExtraction.forward does; whether the "
               "paper pooled before or after that normalisation is unconfirmed (weaka_raw is the other). "
               if normalize_positions else "Pooled without per-position normalisation. ")
            + "Resize 256, centre crop 224 (the paper's TLL preprocessing; weakalign itself resizes to 240×240), "
              "ImageNet mean and std."),
        config=(("normalize_positions", normalize_positions),),
    )


def _shp_entry(name: str, *, scales: tuple[float, ...], mirror: bool, groups: tuple[str, ...]) -> Representation:
    views = "single scale" if len(scales) == 1 and not mirror else (
        f"scales {', '.join(f'{s:.3g}' for s in scales)}{' and their mirror images' if mirror else ''}, descriptors summed")
    return Representation(
        name=name,
        description=f"EdgeMAC (VGG16 on edge maps, MAC), retrieval-SfM-30k, {views}.",
        output_dim=512,
        input_spec=None,
        weights=WeightsSource(file_name="retrievalSfM30k-edgemac-vgg.mat", url=_EDGEMAC_URL,
                              license="MIT (cnnimageretrieval)",
                              notes="MatConvNet DagNN; read with scipy.io, filters permuted to PyTorch's layout."),
        layer="relu5_3",
        pooling="mac",
        builder=_build_edgemac,
        groups=groups,
        provenance=(
            f"Image resized (bilinear) so the longer side is 227; edge map; {EDGE_PADDING} px zero "
            "padding; the file's edge filter, one-channel VGG16 to relu5_3, MAC, L2; " + views + ". The config's "
            "edge_detector records the detector used: 'structured_forest' (OpenCV contrib ximgproc with model.yml.gz, "
            "the detector EdgeMAC was trained with) or the substitute 'sobel_max_rgb' (scikit-image Sobel, max over "
            "RGB), whose features differ from the published ones. Whether the paper used the authors' multi-scale "
            "mirrored extraction is unconfirmed; 'shp' is single-scale, 'shp_ms' the authors' 5 scales plus mirror."),
        config=(("edge_detector", "auto"), ("longer_side", 227), ("scales", scales), ("mirror", mirror),
                ("variable_input_size", True)),
    )


def _register_entries() -> None:
    paper, variants = (GROUP,), (VARIANTS_GROUP,)
    register(_conv_entry("conv", after_relu=False, groups=paper))
    register(_retrieval_entry("ret", whitening=None, scales=(1.0,), groups=paper))
    register(_retrieval_entry("ret_w", whitening="ss", scales=(1.0,), groups=paper))
    register(_shp_entry("shp", scales=(1.0,), mirror=False, groups=paper))
    register(_weaka_entry("weaka", normalize_positions=True, groups=paper))

    places_spec = _image_net_spec(resize=(256, 256))
    for name, arch, dim in (("pl18", "resnet18", 512), ("pl50", "resnet50", 2048)):
        file_name = f"{arch}_places365.pth.tar"
        register(_classification_entry(
            name, f"Places365 {arch}, average-pool output.", arch=arch, num_classes=365, dim=dim,
            weights=WeightsSource(file_name=file_name, url=f"{_PLACES_BASE}/{file_name}", license="CC BY (Places365)",
                                  notes="torch.save dict (epoch, arch, state_dict, best_prec1), module. prefix, "
                                        "saved under Python 2."),
            spec=places_spec,
            provenance="Resize to 256×256, centre crop 224, ImageNet mean and std."))

    register(Representation(
        name="pose",
        description="OpenPose (CMU, COCO) VGG-19 trunk, 128 channels, globally average-pooled.",
        output_dim=128,
        input_spec=InputSpec(resize=368, resize_side="height", crop=None, interpolation="bicubic",
                             mean=(128.0, 128.0, 128.0), std=(256.0, 256.0, 256.0), value_range=255.0,
                             channel_order="BGR", pad_multiple=8, pad_value=128.0),
        weights=WeightsSource(file_name="coco_pose_iter_440000.pth.tar", url=None, license="CMU OpenPose (non-commercial)",
                              notes="pytorch-pose-estimation's conversion of the CMU Caffe model, shared through a "
                                    "file-hosting link with no stable URL; a dict with state_dict."),
        layer="model0 (conv4_4_CPM + ReLU)",
        pooling="avg",
        builder=_build_pose,
        groups=paper,
        provenance=(
            "Input: BGR, x/256 − 0.5, height resized to 368 (bicubic), right and bottom padded with grey (128) to a "
            "multiple of 8, as OpenPose's demo does. Feature: the 128-channel trunk output, average-pooled; the "
            "stages model1_1..model6_2 are ignored. Whether the paper pooled the trunk or the 57 final-stage maps is "
            "unconfirmed. Inputs differ in size, so pass lists to embed()."),
        config=(("variable_input_size", True),),
    ))

    texture_files = (
        ("texture", "Stylized-ImageNet (SIN)",
         "6f41d2e86fc60566f78de64ecff35cc61eb6436f/resnet50_train_60_epochs-c8e5653e.pth.tar"),
        ("texture_SI", "SIN + ImageNet",
         "60b770e128fffcbd8562a3ab3546c1a735432d03/resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar"),
        ("texture_SII", "SIN + ImageNet, fine-tuned on ImageNet",
         "60b770e128fffcbd8562a3ab3546c1a735432d03/resnet50_finetune_60_epochs_lr_decay_after_30_start_"
         "resnet50_train_45_epochs_combined_IN_SF-ca06340c.pth.tar"),
    )
    for name, trained_on, relative in texture_files:
        register(_classification_entry(
            name, f"ResNet-50 trained on {trained_on} (Geirhos et al., ICLR 2019), average-pool output.",
            arch="resnet50", num_classes=1000, dim=2048,
            weights=WeightsSource(file_name=relative.rsplit("/", 1)[1], url=f"{_TEXTURE_BASE}/{relative}",
                                  license="MIT (texture-vs-shape)", notes="checkpoint dict with a module.-prefixed state_dict."),
            spec=_image_net_spec(),
            provenance="Resize 256, centre crop 224, ImageNet mean and std."))

    register(_conv_entry("conv_relu", after_relu=True, groups=variants))
    register(_retrieval_entry("ret_ms", whitening=None, scales=MULTISCALE, groups=variants))
    register(_retrieval_entry("ret_w_ms", whitening="ms", scales=MULTISCALE, groups=variants))
    register(_shp_entry("shp_ms", scales=(0.5, math.sqrt(0.5), 1.0, math.sqrt(2.0), 2.0), mirror=True, groups=variants))
    register(_weaka_entry("weaka_raw", normalize_positions=False, groups=variants))


_register_entries()
