"""Preprocessing derived from a registry entry's `InputSpec`.

Every extractor turns a decoded RGB PIL image into its model input with these
functions, so the numbers (resize, crop, mean, std, scale, channel order) come
from the entry and nowhere else.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from extractors.registry import InputSpec

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                   "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX}


def resize_and_crop(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize and centre-crop an RGB PIL image as `spec` says.

    An integer `spec.resize` sets the shorter side and keeps the aspect ratio
    (the longer side is truncated to an integer, as torchvision does); a
    (height, width) pair sets both. The centre crop takes the top-left corner
    of the two candidate positions when the margin is odd, rounding as
    torchvision's `CenterCrop` does.
    """
    if spec.interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {spec.interpolation!r}; valid: {sorted(_INTERPOLATIONS)}.")
    resample = _INTERPOLATIONS[spec.interpolation]
    if spec.resize is not None:
        width, height = image.size
        if isinstance(spec.resize, int):
            if width <= height:
                size = (spec.resize, int(spec.resize * height / width))
            else:
                size = (int(spec.resize * width / height), spec.resize)
        else:
            size = (int(spec.resize[1]), int(spec.resize[0]))
        if size != image.size:
            image = image.resize(size, resample)
    if spec.crop is not None:
        width, height = image.size
        if width < spec.crop or height < spec.crop:
            raise ValueError(
                f"image of {width}x{height} pixels is smaller than the {spec.crop}-pixel crop; "
                "set InputSpec.resize so that the shorter side is at least the crop.")
        left = int(round((width - spec.crop) / 2.0))
        top = int(round((height - spec.crop) / 2.0))
        image = image.crop((left, top, left + spec.crop, top + spec.crop))
    return image


def to_array(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Scale, reorder and normalise an RGB PIL image into float32 [C, H, W].

    Values go from [0, 255] to [0, spec.value_range], channels to
    `spec.channel_order`, then (x - mean) / std per channel when both are set.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.float32) * (spec.value_range / 255.0)
    if spec.channel_order == "BGR":
        array = array[..., ::-1]
    elif spec.channel_order != "RGB":
        raise ValueError(f"unknown channel_order {spec.channel_order!r}; valid: ['BGR', 'RGB'].")
    if spec.mean is not None:
        array = array - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        array = array / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class TensorPreprocess:
    """Picklable callable: RGB PIL image -> float32 torch tensor [C, H, W] for `spec`."""

    spec: InputSpec

    def __call__(self, image: Image.Image):
        import torch

        return torch.from_numpy(to_array(resize_and_crop(image, self.spec), self.spec))
