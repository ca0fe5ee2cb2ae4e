"""Loaders of the eleven representations of Rosenfeld et al. (arXiv:1903.10920), on synthetic published layouts.

Each synthetic file has the published container, key names and shapes, with
seeded random values. Expected features come from hand-written formulas in
this file (GeM, whitening, pooling), not from the code under test. Inputs
are small (32-pixel images, input specs shrunk with dataclasses.replace) to
keep the suite fast on two CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import pickle
import types
import urllib.error

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

from extractors import checkpoints, paper, paper_models, registry
from extractors.checkpoints import CheckpointError, MissingWeightsError
from extractors.registry import BuildOptions

SMALL_IMAGENET = dict(resize=40, crop=32)


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path_factory):
    # Keep torch's hub cache (the second place weights are looked up) empty.
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))
    yield
    torch.hub.set_dir(previous)


def _random_state(module: torch.nn.Module, seed: int, *, batchnorm_counter: bool = False) -> dict[str, torch.Tensor]:
    """Seeded weights for every key of `module` (built on any device): He-scaled convolutions, mild BatchNorm."""
    generator = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    for key, value in module.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("num_batches_tracked"):
            if batchnorm_counter:
                state[key] = torch.tensor(0)
            continue
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith("running_mean") or (key.endswith("bias") and len(shape) == 1):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # BatchNorm weight
            state[key] = 0.3 + 0.2 * torch.rand(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
    return state


def _meta(factory):
    with torch.device("meta"):
        return factory()


def _load_with_counters(module: torch.nn.Module, state: dict) -> None:
    """Strict assign-load of a reference module built on the meta device; BatchNorm counters default to 0."""
    full = {k: torch.tensor(0) for k in module.state_dict() if k.endswith("num_batches_tracked")}
    full.update(state)
    module.load_state_dict(full, strict=True, assign=True)
    module.eval()


def _images(seed: int = 0, sizes=((32, 32), (40, 24))) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        gradient = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        noise = rng.integers(0, 60, size=(height, width, 3))
        images.append(Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8)))
    return images


def _build(name: str, weights_dir, **spec_overrides) -> paper.PaperExtractor:
    entry = registry.get(name)
    if spec_overrides:
        entry = dataclasses.replace(entry, input_spec=dataclasses.replace(entry.input_spec, **spec_overrides))
    return entry.build(BuildOptions(weights_dir=str(weights_dir)))


def _embed(extractor, images) -> np.ndarray:
    return extractor.embed([extractor.preprocess(image) for image in images])


# ---------------------------------------------------------------------------
# A Python-2 style pickle: str written as SHORT_BINSTRING, the opcode Python 2
# used for its byte strings, which Python 3 reads only with an encoding.


class _Python2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj):
        data = obj.encode("latin1")
        assert len(data) < 256, "only short strings are needed here"
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        self.memoize(obj)

    dispatch[str] = _save_str


_PYTHON2_PICKLE = types.ModuleType("python2_pickle")
_PYTHON2_PICKLE.Pickler = _Python2Pickler
_PYTHON2_PICKLE.dump = lambda obj, file, protocol=2: _Python2Pickler(file, protocol).dump(obj)


def _save_python2(obj, path) -> None:
    torch.save(obj, path, pickle_module=_PYTHON2_PICKLE, pickle_protocol=2, _use_new_zipfile_serialization=False)


# ---------------------------------------------------------------------------
# Registry.


def test_paper_group_is_the_eleven():
    assert registry.names("paper") == [
        "conv", "ret", "ret_w", "shp", "weaka", "pl18", "pl50", "pose", "texture", "texture_SI", "texture_SII"]
    assert [entry.name for entry in registry.resolve("paper")] == registry.names("paper")


@pytest.mark.parametrize("name", registry.names("paper") + registry.names("paper_variants"))
def test_entry_is_complete(name):
    entry = registry.get(name)
    assert entry.output_dim in (128, 512, 1024, 2048)
    assert entry.weights.file_name
    assert entry.provenance
    assert entry.fingerprint()["name"] == name


# ---------------------------------------------------------------------------
# Preprocessing.


def test_imagenet_transform_matches_torchvision():
    from torchvision import transforms

    image = _images(sizes=((300, 200),))[0]
    reference = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(registry.IMAGENET_MEAN, registry.IMAGENET_STD)])
    ours = paper.input_transform(registry.get("texture").input_spec)(image)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, reference(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,expected", [((1200, 600), (512, 1024)), ((300, 200), (200, 300)),
                                           ((700, 1400), (1024, 512))])
def test_retrieval_transform_only_shrinks(size, expected):
    image = Image.new("RGB", size, (10, 20, 30))
    x = paper.input_transform(registry.get("ret").input_spec)(image)
    assert tuple(x.shape[1:]) == expected


# ---------------------------------------------------------------------------
# conv: torchvision DenseNet-121 with its legacy "norm.1" key names.


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("conv")
    state = _random_state(_meta(lambda: torchvision.models.densenet121(weights=None)), seed=1)
    legacy = collections.OrderedDict(
        (key.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.")
            .replace(".norm2.", ".norm.2.").replace(".conv2.", ".conv.2.")
         if "denselayer" in key else key, value)
        for key, value in state.items())
    torch.save(legacy, directory / "densenet121-a639ec97.pth")
    return directory


def test_conv_loads_legacy_keys(conv_dir):
    features = _embed(_build("conv", conv_dir, **SMALL_IMAGENET), _images())
    assert features.shape == (2, 1024)
    assert features.dtype == np.float32
    # Pooled before the final ReLU, so the batch-normalised features take negative values.
    assert (features < 0).any()


def test_conv_relu_variant_is_nonnegative(conv_dir):
    features = _embed(_build("conv_relu", conv_dir, **SMALL_IMAGENET), _images())
    assert features.shape == (2, 1024)
    assert (features >= 0).all()


def test_conv_downloads_into_hub_cache(conv_dir, tmp_path, monkeypatch):
    fetched = []

    def fake_download(url, destination, *, hash_prefix):
        fetched.append((url, hash_prefix))
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.symlink(conv_dir / "densenet121-a639ec97.pth", destination)

    monkeypatch.setattr(checkpoints, "_download", fake_download)
    extractor = _build("conv", tmp_path, **SMALL_IMAGENET)
    assert fetched == [("https://download.pytorch.org/models/densenet121-a639ec97.pth", "a639ec97")]
    assert os.path.exists(os.path.join(checkpoints.hub_checkpoint_dir(), "densenet121-a639ec97.pth"))
    assert extractor.representation.name == "conv"


def test_conv_download_failure_names_file(tmp_path, monkeypatch):
    def offline(url, destination, *, hash_prefix):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(checkpoints, "_download", offline)
    with pytest.raises(MissingWeightsError) as raised:
        registry.get("conv").build(BuildOptions(weights_dir=str(tmp_path)))
    message = str(raised.value)
    assert "densenet121-a639ec97.pth" in message
    assert "https://download.pytorch.org/models/densenet121-a639ec97.pth" in message
    assert str(tmp_path) in message
    assert checkpoints.hub_checkpoint_dir() in message
    assert "URLError" in message


# ---------------------------------------------------------------------------
# ret and ret_w: cnnimageretrieval-pytorch container with meta['Lw'].

RETRIEVAL_FILE = "retrievalSfM120k-resnet101-gem-b80fb85.pth"
LEARNED_P = 2.75


def _whitening(rng, dim=2048):
    return {"m": rng.normal(size=(dim, 1)).astype(np.float32),
            "P": (rng.normal(size=(dim, dim)) / math.sqrt(dim)).astype(np.float32)}


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ret")
    state = _random_state(_meta(lambda: paper_models.RetrievalNet("resnet101")), seed=2)
    state["pool.p"] = torch.tensor([LEARNED_P])
    rng = np.random.default_rng(3)
    lw = {"retrieval-SfM-120k": {"ss": _whitening(rng), "ms": _whitening(rng)}}
    meta = {"architecture": "resnet101", "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "outputdim": 2048, "Lw": lw}
    torch.save({"state_dict": state, "meta": meta}, directory / RETRIEVAL_FILE)
    return types.SimpleNamespace(directory=directory, state=state, lw=lw)


@pytest.fixture(scope="module")
def ret_extractors(retrieval):
    return {name: _build(name, retrieval.directory) for name in ("ret", "ret_w", "ret_w_ms")}


def _gem_by_hand(state, images, spec) -> torch.Tensor:
    """ResNet-101 features, GeM with the file's p, L2 with ε 1e-6: the published descriptor, written out."""
    network = _meta(lambda: torchvision.models.resnet101(weights=None))
    features_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    trunk = torch.nn.Sequential(*list(network.children())[:-2])
    _load_with_counters(trunk, features_state)
    transform = paper.input_transform(spec)
    rows = []
    with torch.no_grad():
        for image in images:
            x = trunk(transform(image)[None])
            pooled = x.clamp(min=1e-6).pow(LEARNED_P).mean(dim=(2, 3)).pow(1 / LEARNED_P)
            rows.append(pooled / (pooled.norm(dim=1, keepdim=True) + 1e-6))
    return torch.cat(rows)


def test_ret_uses_learned_gem_exponent(retrieval, ret_extractors):
    extractor = ret_extractors["ret"]
    images = _images()
    features = _embed(extractor, images)
    assert features.shape == (2, 2048)
    assert extractor.network.pool.p.item() == pytest.approx(LEARNED_P)
    expected = _gem_by_hand(retrieval.state, images, registry.get("ret").input_spec)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_ret_w_is_whitened_ret(retrieval, ret_extractors):
    images = _images()
    plain = _embed(ret_extractors["ret"], images).astype(np.float64)
    whitened = _embed(ret_extractors["ret_w"], images)
    learned = retrieval.lw["retrieval-SfM-120k"]["ss"]
    by_hand = (learned["P"].astype(np.float64) @ (plain.T - learned["m"])).T
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True) + 1e-6
    assert whitened.shape == (2, 2048)
    np.testing.assert_allclose(whitened, by_hand, rtol=1e-4, atol=1e-5)


def test_ret_w_ms_aggregates_scales(retrieval, ret_extractors):
    extractor = ret_extractors["ret_w_ms"]
    image = _images()[0]
    views = extractor.preprocess(image)
    assert [tuple(v.shape[1:]) for v in views] == [(32, 32), (22, 22), (16, 16)]  # floor(32 · scale)
    features = extractor.embed([views])
    per_scale = ret_extractors["ret"].embed(list(views)).astype(np.float64)
    pooled = np.mean(per_scale ** LEARNED_P, axis=0) ** (1 / LEARNED_P)
    pooled /= np.linalg.norm(pooled)
    learned = retrieval.lw["retrieval-SfM-120k"]["ms"]
    by_hand = learned["P"].astype(np.float64) @ (pooled - learned["m"][:, 0])
    by_hand /= np.linalg.norm(by_hand) + 1e-6
    np.testing.assert_allclose(features[0], by_hand, rtol=1e-4, atol=1e-5)


def test_ret_stacked_batch_matches_list(ret_extractors):
    extractor = ret_extractors["ret"]
    images = _images(sizes=((32, 32), (32, 32)))
    stacked = extractor.embed(torch.stack([extractor.preprocess(image) for image in images]))
    np.testing.assert_allclose(stacked, _embed(extractor, images), rtol=1e-5, atol=1e-6)


def test_ret_w_without_whitening_rejected(retrieval, tmp_path):
    container = checkpoints.load_checkpoint(str(retrieval.directory / RETRIEVAL_FILE))
    del container["meta"]["Lw"]
    torch.save(container, tmp_path / RETRIEVAL_FILE)
    with pytest.raises(CheckpointError, match=r"meta\['Lw'\]"):
        _build("ret_w", tmp_path)


def test_ret_missing_key_named(retrieval, tmp_path):
    state = dict(retrieval.state)
    del state["pool.p"]
    torch.save({"state_dict": state, "meta": {"architecture": "resnet101"}}, tmp_path / RETRIEVAL_FILE)
    with pytest.raises(CheckpointError, match=r"missing keys \[pool\.p\]"):
        _build("ret", tmp_path)


# ---------------------------------------------------------------------------
# weaka: weakalign checkpoint with argparse args and two regression heads.

WEAKALIGN_FILE = "weakalign_resnet101_affine_tps.pth.tar"


def _regression_state(prefix, output_dim, seed):
    head = torch.nn.Module()
    head.conv = torch.nn.Sequential(
        torch.nn.Conv2d(225, 128, 7), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 64, 5), torch.nn.BatchNorm2d(64), torch.nn.ReLU())
    head.linear = torch.nn.Linear(64 * 5 * 5, output_dim)
    return {f"{prefix}.{k}": v for k, v in _random_state(head, seed).items()}


@pytest.fixture(scope="module")
def weakalign_state():
    trunk = _random_state(_meta(lambda: paper_models.resnet_trunk("resnet101", "layer3")), seed=4)
    state = collections.OrderedDict((f"FeatureExtraction.model.{k}", v) for k, v in trunk.items())
    state.update(_regression_state("FeatureRegression", 6, seed=5))
    state.update(_regression_state("FeatureRegression2", 18, seed=6))
    return state


def _save_weakalign(state, directory):
    args = argparse.Namespace(feature_extraction_cnn="resnet101", lr=5e-8, num_epochs=10)
    optimizer = {"state": {}, "param_groups": [{"lr": 5e-8, "params": [0, 1, 2]}]}
    torch.save({"epoch": 10, "args": args, "state_dict": state, "best_test_loss": -0.5,
                "optimizer": optimizer, "train_loss": np.zeros(10), "test_loss": np.zeros(10)},
               directory / WEAKALIGN_FILE)


@pytest.fixture(scope="module")
def weakalign_dir(tmp_path_factory, weakalign_state):
    directory = tmp_path_factory.mktemp("weaka")
    _save_weakalign(weakalign_state, directory)
    return directory


def test_weaka_pools_normalised_layer3(weakalign_dir, weakalign_state):
    extractor = _build("weaka", weakalign_dir, **SMALL_IMAGENET)
    images = _images()
    features = _embed(extractor, images)
    assert features.shape == (2, 1024)

    trunk = _meta(lambda: paper_models.resnet_trunk("resnet101", "layer3"))
    _load_with_counters(trunk, {k[len("FeatureExtraction.model."):]: v for k, v in weakalign_state.items()
                                if k.startswith("FeatureExtraction.model.")})
    with torch.no_grad():
        x = trunk(extractor.preprocess(images[0])[None])
        x = x / torch.sqrt((x ** 2).sum(dim=1, keepdim=True) + 1e-6)
        expected = x.mean(dim=(2, 3))[0].numpy()
    np.testing.assert_allclose(features[0], expected, rtol=1e-4, atol=1e-6)


def test_weaka_reads_older_vgg_keys(weakalign_state, tmp_path):
    older = collections.OrderedDict((k.replace("FeatureExtraction.model.", "FeatureExtraction.vgg."), v)
                                    for k, v in weakalign_state.items())
    _save_weakalign(older, tmp_path)
    assert _embed(_build("weaka_raw", tmp_path, **SMALL_IMAGENET), _images()).shape == (2, 1024)


def test_weaka_unexpected_key_named(weakalign_state, tmp_path):
    state = collections.OrderedDict(weakalign_state)
    state["FeatureExtraction.model.7.extra"] = torch.zeros(1)
    _save_weakalign(state, tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[FeatureExtraction\.model\.7\.extra\]"):
        _build("weaka", tmp_path)


def test_weaka_ignored_head_must_exist(weakalign_state, tmp_path):
    state = collections.OrderedDict(weakalign_state)
    del state["FeatureRegression2.linear.bias"]
    _save_weakalign(state, tmp_path)
    with pytest.raises(CheckpointError, match=r"FeatureRegression2\.linear\.bias"):
        _build("weaka", tmp_path)


# ---------------------------------------------------------------------------
# pl18, pl50 (Python-2 pickles, module. prefix) and the texture ResNet-50s.


def _classification_state(arch, num_classes, seed):
    state = _random_state(_meta(lambda: getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)),
                          seed=seed)
    return collections.OrderedDict((f"module.{k}", v) for k, v in state.items())


@pytest.fixture(scope="module")
def places_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("places")
    for arch, seed in (("resnet18", 7), ("resnet50", 8)):
        container = {"epoch": 90, "arch": arch, "state_dict": _classification_state(arch, 365, seed),
                     "best_prec1": 54.7}
        _save_python2(container, directory / f"{arch}_places365.pth.tar")
    return directory


def test_places_file_is_python2_style(places_dir):
    data = (places_dir / "resnet18_places365.pth.tar").read_bytes()
    assert pickle.SHORT_BINSTRING + bytes([len("state_dict")]) + b"state_dict" in data
    assert not data.startswith(b"PK")  # the legacy format, not a zip archive


@pytest.mark.parametrize("name,dim", [("pl18", 512), ("pl50", 2048)])
def test_places_average_pool(places_dir, name, dim):
    features = _embed(_build(name, places_dir, resize=(40, 40), crop=32), _images())
    assert features.shape == (2, dim)
    assert (features >= 0).all()  # the average pool of ReLU outputs


def test_places_wrong_classifier_shape_named(tmp_path):
    state = _classification_state("resnet18", 1000, seed=9)
    torch.save({"arch": "resnet18", "state_dict": state}, tmp_path / "resnet18_places365.pth.tar")
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        _build("pl18", tmp_path)


def test_places_wrong_shape_named(tmp_path):
    state = _classification_state("resnet18", 365, seed=9)
    state["module.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save({"arch": "resnet18", "state_dict": state}, tmp_path / "resnet18_places365.pth.tar")
    with pytest.raises(CheckpointError, match=r"shape mismatches \[layer1\.0\.conv1\.weight"):
        _build("pl18", tmp_path)


def test_texture_three_files(tmp_path):
    container = {"epoch": 60, "arch": "resnet50", "state_dict": _classification_state("resnet50", 1000, seed=10),
                 "best_acc1": 60.2, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    first = registry.get("texture").weights.file_name
    torch.save(container, tmp_path / first)
    for name in ("texture_SI", "texture_SII"):
        os.symlink(tmp_path / first, tmp_path / registry.get(name).weights.file_name)
    for name in ("texture", "texture_SI", "texture_SII"):
        assert _embed(_build(name, tmp_path, **SMALL_IMAGENET), _images()).shape == (2, 2048)


# ---------------------------------------------------------------------------
# pose: the OpenPose trunk among the stage heads.

POSE_FILE = "coco_pose_iter_440000.pth.tar"


@pytest.fixture(scope="module")
def pose_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pose")
    trunk = _random_state(paper_models.openpose_trunk(), seed=11)
    state = collections.OrderedDict((f"model0.{k}", v) for k, v in trunk.items())
    # The stage heads are ignored, so tiny stand-ins keep the file small.
    state.update((key, torch.zeros(1)) for key in paper_models.openpose_stage_keys())
    torch.save({"state_dict": state}, directory / POSE_FILE)
    return directory


def test_pose_input_convention():
    spec = dataclasses.replace(registry.get("pose").input_spec, resize=36)
    image = Image.new("RGB", (50, 25), (255, 0, 0))
    x = paper.input_transform(spec)(image)
    assert tuple(x.shape) == (3, 40, 72)  # height 36 padded to 40; width 72 is already a multiple of 8
    # BGR order and x/256 - 0.5: red is channel 2; the grey padding (128) becomes 0.
    np.testing.assert_allclose(x[:, 10, 10].numpy(), [0 / 256 - 0.5, 0 / 256 - 0.5, 255 / 256 - 0.5], atol=1e-6)
    np.testing.assert_allclose(x[:, 38, 70].numpy(), [0.0, 0.0, 0.0], atol=1e-6)


def test_pose_trunk_features(pose_dir):
    features = _embed(_build("pose", pose_dir, resize=32), _images())
    assert features.shape == (2, 128)


def test_pose_missing_stage_key_named(pose_dir, tmp_path):
    container = checkpoints.load_checkpoint(str(pose_dir / POSE_FILE))
    del container["state_dict"]["model6_2.12.bias"]
    torch.save(container, tmp_path / POSE_FILE)
    with pytest.raises(CheckpointError, match=r"model6_2\.12\.bias"):
        _build("pose", tmp_path)


# ---------------------------------------------------------------------------
# shp: EdgeMAC in the MatConvNet DagNN layout, written with scipy.io.savemat.

EDGEMAC_FILE = "retrievalSfM30k-edgemac-vgg.mat"
EDGE_PARAMS = {"edgelayer_w": 10.0, "edgelayer_p": 0.4947, "edgelayer_s": 500.0, "edgelayer_t": 0.0985}


def _cell(strings):
    cell = np.empty((1, len(strings)), dtype=object)
    for i, text in enumerate(strings):
        cell[0, i] = text
    return cell


def _edgemac_dagnn(seed: int, *, extra_param: bool = False, bad_shape: bool = False) -> dict:
    """A DagNN struct as saveobj writes it: VGG16 layers first, the edge layer appended, then pooling and losses."""
    rng = np.random.default_rng(seed)
    layers, params = [], []

    def layer(name, kind, inputs, outputs, names=(), block=None):
        layers.append({"name": name, "type": f"dagnn.{kind}", "inputs": _cell(inputs), "outputs": _cell(outputs),
                       "params": _cell(names), "block": block or {}})

    variable, channels, block_index, conv_index = "x0", 1, 1, 1
    for item in paper_models.VGG16_CONVS:
        if item == "M":
            layer(f"pool{block_index}", "Pooling", [variable], [f"{variable}p"],
                  block={"method": "max", "poolSize": np.array([[2.0, 2.0]]), "stride": np.array([[2.0, 2.0]]),
                         "pad": np.zeros((1, 4))})
            variable, block_index, conv_index = f"{variable}p", block_index + 1, 1
            continue
        name = f"conv{block_index}_{conv_index}"
        in_channels = channels + 1 if bad_shape and name == "conv3_2" else channels
        weight = (rng.normal(size=(3, 3, in_channels, item)) * math.sqrt(2.0 / (9 * in_channels))).astype(np.float32)
        params += [(f"{name}f", weight), (f"{name}b", (0.01 * rng.normal(size=(item, 1))).astype(np.float32))]
        layer(name, "Conv", [variable], [f"{name}x"], [f"{name}f", f"{name}b"],
              block={"size": np.array([[3.0, 3.0, in_channels, item]]), "hasBias": True,
                     "pad": np.ones((1, 4)), "stride": np.ones((1, 2))})
        layer(f"relu{block_index}_{conv_index}", "ReLU", [f"{name}x"], [f"{name}r"], block={"leak": 0.0})
        variable, channels, conv_index = f"{name}r", item, conv_index + 1
    layer("edgelayer", "EdgeFilter", ["input"], ["x0"], list(EDGE_PARAMS))
    params += [(name, np.array([[value]], dtype=np.float32)) for name, value in EDGE_PARAMS.items()]
    layer("pooldescriptor", "MAC", [variable], ["pooldescriptor"])
    layer("l2descriptor", "L2N", ["pooldescriptor"], ["l2descriptor"])
    layer("objective", "ContrastiveLoss", ["l2descriptor", "label"], ["objective"], block={"margin": 0.7})
    layer("error", "BatchMAP", ["l2descriptor", "label"], ["error"])
    if extra_param:
        params.append(("fc6f", np.zeros((1, 1, 512, 8), dtype=np.float32)))

    params_array = np.empty((1, len(params)), dtype=[(f, object) for f in ("name", "value", "learningRate", "weightDecay")])
    for i, (name, value) in enumerate(params):
        params_array[0, i] = (name, value, 1.0, 1.0)
    layers_array = np.empty((1, len(layers)), dtype=[(f, object) for f in ("name", "type", "inputs", "outputs", "params", "block")])
    for i, entry in enumerate(layers):
        layers_array[0, i] = tuple(entry[f] for f in ("name", "type", "inputs", "outputs", "params", "block"))
    return {"vars": {"name": "x0", "precious": False}, "params": params_array, "layers": layers_array,
            "meta": {"normalization": {"averageImage": np.zeros((1, 1, 3))}}}


@pytest.fixture(scope="module")
def edgemac(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shp")
    net = _edgemac_dagnn(seed=12)
    scipy.io.savemat(directory / EDGEMAC_FILE, {"net": net})
    return types.SimpleNamespace(directory=directory, net=net)


def test_shp_loads_dagnn(edgemac):
    extractor = _build("shp", edgemac.directory)
    assert extractor.network.edge_filter.p.item() == pytest.approx(0.4947)
    assert extractor.network.edge_filter.t.item() == pytest.approx(0.0985)
    # MatConvNet [H, W, C_in, C_out] becomes PyTorch [C_out, C_in, H, W].
    conv1_filter = [value for name, value, *_ in edgemac.net["params"][0] if name == "conv1_1f"][0]
    np.testing.assert_array_equal(extractor.network.features[0].weight[5, 0].detach().numpy(), conv1_filter[:, :, 0, 5])
    conv3_filter = [value for name, value, *_ in edgemac.net["params"][0] if name == "conv2_1f"][0]
    np.testing.assert_array_equal(extractor.network.features[5].weight[7, 3].detach().numpy(), conv3_filter[:, :, 3, 7])


def test_shp_records_edge_detector(edgemac):
    entry = dataclasses.replace(registry.get("shp"), config=tuple(
        (k, 40 if k == "longer_side" else v) for k, v in registry.get("shp").config))
    extractor = entry.build(BuildOptions(weights_dir=str(edgemac.directory)))
    config = dict(extractor.representation.config)
    assert config["edge_detector"] in ("structured_forest", "sobel_max_rgb")
    assert extractor.representation.fingerprint()["config"]["edge_detector"] == config["edge_detector"]
    views = extractor.preprocess(_images()[1])
    assert [tuple(v.shape) for v in views] == [(1, 24 + 60, 40 + 60)]  # 40×24 image, longer side 40, 30 px padding
    features = _embed(extractor, _images())
    assert features.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-4)


def test_shp_unused_param_named(tmp_path):
    scipy.io.savemat(tmp_path / EDGEMAC_FILE, {"net": _edgemac_dagnn(seed=13, extra_param=True)})
    with pytest.raises(CheckpointError, match=r"unexpected parameters \['fc6f'\]"):
        _build("shp", tmp_path)


def test_shp_wrong_filter_shape_named(tmp_path):
    scipy.io.savemat(tmp_path / EDGEMAC_FILE, {"net": _edgemac_dagnn(seed=13, bad_shape=True)})
    with pytest.raises(CheckpointError, match=r"shape mismatches \[features\.12\.weight"):
        _build("shp", tmp_path)


def test_shp_not_a_dagnn(tmp_path):
    scipy.io.savemat(tmp_path / EDGEMAC_FILE, {"weights": np.zeros(3)})
    with pytest.raises(CheckpointError, match="no MatConvNet DagNN"):
        _build("shp", tmp_path)


# ---------------------------------------------------------------------------
# Safety and missing files.


class _Payload:
    """A class outside the allowlist: unpickling it would import and call code."""


def test_pickled_object_outside_allowlist_rejected(tmp_path):
    state = _classification_state("resnet18", 365, seed=14)
    torch.save({"arch": "resnet18", "state_dict": state, "extra": _Payload()},
               tmp_path / "resnet18_places365.pth.tar")
    with pytest.raises(CheckpointError, match=r"_Payload.*--trust_checkpoints"):
        _build("pl18", tmp_path)

    trusted = registry.get("pl18").build(BuildOptions(weights_dir=str(tmp_path), trust_checkpoints=True))
    assert trusted.representation.name == "pl18"


def test_missing_file_names_url_and_directories(tmp_path):
    with pytest.raises(MissingWeightsError) as raised:
        _build("ret", tmp_path)
    message = str(raised.value)
    assert RETRIEVAL_FILE in message
    assert "http://cmp.felk.cvut.cz/cnnimageretrieval/" in message
    assert str(tmp_path) in message
    assert checkpoints.hub_checkpoint_dir() in message
