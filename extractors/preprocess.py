"""Preprocessing derived from a registry entry's `InputSpec`.

Every extractor turns a decoded RGB PIL image into its model input with these
functions, so the numbers (resize, crop, padding, scale, channel order, mean,
std) come from the entry and nowhere else. The steps run in a fixed order:
resize, centre crop, pad the right and bottom edges, scale to
[0, value_range], reorder channels, normalise with mean and std.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from extractors.registry import InputSpec

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
}
_RESIZE_SIDES = ("shorter", "longer", "height")


def validate_spec(spec: InputSpec) -> None:
    """Raise ValueError when `spec` names an unknown interpolation, resize side or channel order."""
    if spec.interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {spec.interpolation!r}; valid: {sorted(_INTERPOLATIONS)}.")
    if spec.resize_side not in _RESIZE_SIDES:
        raise ValueError(f"unknown resize_side {spec.resize_side!r}; valid: {list(_RESIZE_SIDES)}.")
    if spec.channel_order not in ("RGB", "BGR"):
        raise ValueError(f"unknown channel_order {spec.channel_order!r}; valid: ['BGR', 'RGB'].")


def resize_and_crop(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize, centre-crop and pad an RGB PIL image as `spec` specifies."""
    validate_spec(spec)
    image = resize_image(image.convert("RGB"), spec)
    if spec.crop is not None:
        image = center_crop(image, spec.crop)
    if spec.pad_multiple:
        image = pad_to_multiple(image, spec.pad_multiple, round(spec.pad_value * 255.0 / spec.value_range))
    return image


def to_array(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Scale, reorder and normalise an RGB PIL image into float32 [C, H, W].

    Values go from [0, 255] to [0, spec.value_range], channels to
    `spec.channel_order`, then (x - mean) / std per channel when both are set.
    """
    validate_spec(spec)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) * (spec.value_range / 255.0)
    if spec.channel_order == "BGR":
        array = array[..., ::-1]
    if spec.mean is not None:
        array = array - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        array = array / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class TensorPreprocess:
    """Picklable callable (for DataLoader workers): RGB PIL image -> float32 tensor [C, H, W]."""

    spec: InputSpec

    def __call__(self, image: Image.Image):
        import torch

        return torch.from_numpy(to_array(resize_and_crop(image, self.spec), self.spec))


def input_transform(spec: InputSpec) -> TensorPreprocess:
    """Return the function from an RGB PIL image to the float32 input [C, H, W] that `spec` describes.

    Raises:
      ValueError: `spec` names an unknown interpolation, resize side or channel order.
    """
    validate_spec(spec)
    return TensorPreprocess(spec)


def resize_image(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize `image` to the size that `spec.resize` and `spec.resize_side` set.

    The other side's length is truncated for "shorter" (as torchvision's
    Resize) and "longer", and rounded for "height" (as OpenCV's resize with
    a scale factor, which OpenPose's demo used).

    NOTE: "longer" stands for PIL's `thumbnail`, which cnnimageretrieval-pytorch
    uses; truncation there is recalled from Pillow releases of 2018 and not
    checked, so the shorter side may differ by one pixel from a given Pillow.
    """
    if spec.resize is None:
        return image
    width, height = image.size
    resample = _INTERPOLATIONS[spec.interpolation]
    if isinstance(spec.resize, tuple):
        new_height, new_width = spec.resize
        return image.resize((new_width, new_height), resample)

    reference = {"shorter": min(width, height), "longer": max(width, height), "height": height}[spec.resize_side]
    if reference == spec.resize or (not spec.upscale and reference < spec.resize):
        return image
    scale = spec.resize / reference
    if spec.resize_side == "shorter" and width <= height:
        new_width, new_height = spec.resize, int(spec.resize * height / width)
    elif spec.resize_side == "shorter":
        new_width, new_height = int(spec.resize * width / height), spec.resize
    elif spec.resize_side == "longer" and width >= height:
        new_width, new_height = spec.resize, max(1, int(height * scale))
    elif spec.resize_side == "longer":
        new_width, new_height = max(1, int(width * scale)), spec.resize
    else:
        new_width, new_height = max(1, round(width * scale)), spec.resize
    return image.resize((new_width, new_height), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central size × size square; offsets round as torchvision's CenterCrop does."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"image of {width}x{height} pixels is smaller than the {size}-pixel crop; "
                         "set InputSpec.resize so that the shorter side is at least the crop.")
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def pad_to_multiple(image: Image.Image, multiple: int, fill: int) -> Image.Image:
    """Pad the right and bottom edges with `fill` (0–255) up to the next multiple of `multiple`."""
    width, height = image.size
    new_width = -(-width // multiple) * multiple
    new_height = -(-height // multiple) * multiple
    if (new_width, new_height) == (width, height):
        return image
    padded = Image.new("RGB", (new_width, new_height), (fill, fill, fill))
    padded.paste(image, (0, 0))
    return padded
