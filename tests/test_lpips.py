"""LPIPS taps, profiles and distances against the `lpips` package (0.1.4) and a float64 brute force."""

from __future__ import annotations

import os

import lpips as lpips_package
import numpy as np
import pytest
import torch
import torchvision

from engine import lpips
from extractors import checkpoints, lpips_nets

NETS = ("alex", "vgg", "squeeze")
RTOL = 1e-5


def _random_state_file(directory, net: str, seed: int = 0) -> str:
    return lpips_nets.write_random_backbone(net, os.path.join(directory, f"{net}-random.pth"), seed=seed)


def _reference_model(net: str, state_path: str, *, version: str = "0.1", spatial: bool = False):
    # pnet_rand=True builds the package's model without downloading a backbone.
    model = lpips_package.LPIPS(net=net, version=version, lpips=True, pnet_rand=True,
                                spatial=spatial, verbose=False)
    return lpips_nets.load_backbone_into_package(model, state_path).eval()


@pytest.fixture(scope="module", params=NETS)
def random_net(request, tmp_path_factory):
    """(net, state-dict path, the package's calibrated model) with one random backbone."""
    net = request.param
    state_path = _random_state_file(tmp_path_factory.mktemp(net), net)
    return net, state_path, _reference_model(net, state_path)


def _images(count: int, seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(-1, 1, (count, size // 8, size // 8, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return np.clip(smooth + 0.3 * rng.standard_normal((count, size, size, 3)), -1, 1).astype(np.float32)


def _to_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def triplets():
    return _images(4, 1), _images(4, 2), _images(4, 3)


def _our_profiles(net, state_path, triplets, version="0.1"):
    source = lpips_nets.resolve_backbone(net, weights_path=state_path)
    extractor = lpips_nets.build_tap_extractor(net, source, version=version)
    acts = [lpips_nets.extract_taps(extractor, x) for x in triplets]
    return lpips.triplet_profiles(*acts)


def _package_distances(model, triplets, *, calibrated: bool):
    # `lpips` is the flag the package's forward pass reads to choose between
    # the calibrated distance and the unweighted channel sum (lpips=False).
    ref, p0, p1 = (_to_torch(x) for x in triplets)
    model.lpips = calibrated
    try:
        with torch.no_grad():
            return model(ref, p0).reshape(-1).numpy(), model(ref, p1).reshape(-1).numpy()
    finally:
        model.lpips = True


def test_distances_match_lpips_package(random_net, triplets):
    net, state_path, model = random_net
    profile0, profile1 = _our_profiles(net, state_path, triplets)
    spec = lpips_nets.get_net(net)
    weightings = lpips.metric_weightings(net, spec.channels, lpips_nets.load_linear_weights(net))

    for calibrated, name in ((True, f"{net}-lin"), (False, net)):
        expected0, expected1 = _package_distances(model, triplets, calibrated=calibrated)
        np.testing.assert_allclose(lpips.distance(profile0, weightings[name]), expected0, rtol=RTOL)
        np.testing.assert_allclose(lpips.distance(profile1, weightings[name]), expected1, rtol=RTOL)

    # Single taps: the package's per-layer outputs of the uncalibrated distance.
    model.lpips = False
    try:
        with torch.no_grad():
            _, per_layer = model(_to_torch(triplets[0]), _to_torch(triplets[1]), retPerLayer=True)
    finally:
        model.lpips = True
    for tap, layer in enumerate(per_layer):
        np.testing.assert_allclose(
            lpips.distance(profile0, weightings[f"{net}-l{tap}"]), layer.reshape(-1).numpy(), rtol=RTOL)


def test_version_0_0_matches_lpips_package(tmp_path, triplets):
    state_path = _random_state_file(tmp_path, "alex")
    model = _reference_model("alex", state_path, version="0.0")
    profile0, profile1 = _our_profiles("alex", state_path, triplets, version="0.0")
    weights = lpips.calibrated_weights(lpips_nets.load_linear_weights("alex", "0.0"), (64, 192, 384, 256, 256))
    expected0, expected1 = _package_distances(model, triplets, calibrated=True)
    np.testing.assert_allclose(lpips.distance(profile0, weights), expected0, rtol=RTOL)
    np.testing.assert_allclose(lpips.distance(profile1, weights), expected1, rtol=RTOL)


def test_spatial_map_matches_lpips_package(tmp_path, triplets):
    state_path = _random_state_file(tmp_path, "alex")
    extractor = lpips_nets.build_tap_extractor("alex", lpips_nets.resolve_backbone("alex", weights_path=state_path))
    ref, p0, _ = triplets
    acts_ref, acts_p0 = (lpips_nets.extract_taps(extractor, x) for x in (ref, p0))
    model = _reference_model("alex", state_path, spatial=True)
    with torch.no_grad():
        expected = model(_to_torch(ref), _to_torch(p0))[:, 0].numpy()
    got = lpips.spatial_distance_map(acts_ref, acts_p0, (64, 64), lpips_nets.load_linear_weights("alex"))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_profile_matches_float64_reference():
    rng = np.random.default_rng(0)
    shapes = [(3, 4, 5, 5), (3, 6, 2, 3)]
    acts_a = [np.maximum(rng.standard_normal(s), 0).astype(np.float32) for s in shapes]
    acts_b = [np.maximum(rng.standard_normal(s), 0).astype(np.float32) for s in shapes]
    # An all-zero position (every channel 0 after the ReLU) normalises to 0.
    acts_a[0][0, :, 1, 1] = 0.0
    # Identical pairs give zero (up to float32 rounding of the normalisation).
    acts_b[1][2] = acts_a[1][2]
    got = lpips.channel_profile(acts_a, acts_b)
    expected = lpips.channel_profile_reference(acts_a, acts_b)
    assert got.shape == (3, 10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert np.all(got[2, 4:] < 1e-12)


def test_triplet_profiles_equal_pairwise_profiles():
    rng = np.random.default_rng(1)
    acts = [[rng.random((2, 3, 4, 4)).astype(np.float32)] for _ in range(3)]
    profile0, profile1 = lpips.triplet_profiles(*acts)
    np.testing.assert_allclose(profile0, lpips.channel_profile(acts[0], acts[1]), rtol=1e-6)
    np.testing.assert_allclose(profile1, lpips.channel_profile(acts[0], acts[2]), rtol=1e-6)


def test_weightings_cover_taps():
    weightings = lpips.metric_weightings("net", (2, 3), [np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0])])
    assert list(weightings) == ["net-lin", "net", "net-l0", "net-l1"]
    np.testing.assert_array_equal(weightings["net-lin"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(weightings["net-l1"], [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="channels per tap"):
        lpips.calibrated_weights([np.ones(2)], (2, 3))


@pytest.mark.parametrize("net", NETS)
def test_linear_weights_load_strictly(net):
    weights = lpips_nets.load_linear_weights(net)
    assert [w.size for w in weights] == list(lpips_nets.get_net(net).channels)
    assert all((w >= 0).all() for w in weights)


def test_linear_weights_reject_wrong_keys(tmp_path):
    path = os.path.join(tmp_path, "alex.pth")
    state = {f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256))}
    torch.save(state, path)
    with pytest.raises(lpips_nets.LpipsWeightsError, match="missing \\['lin4.model.1.weight'\\]"):
        lpips_nets.load_linear_weights("alex", path=path)

    state["lin4.model.1.weight"] = -torch.ones(1, 256, 1, 1)
    torch.save(state, path)
    with pytest.raises(lpips_nets.LpipsWeightsError, match="negative"):
        lpips_nets.load_linear_weights("alex", path=path)


def test_backbone_file_loads_whole_classifier(tmp_path):
    torch.manual_seed(3)
    model = torchvision.models.squeezenet1_1(weights=None)
    path = os.path.join(tmp_path, "squeeze.pth")
    torch.save(model.state_dict(), path)
    features = lpips_nets.build_features("squeeze", lpips_nets.resolve_backbone("squeeze", weights_path=path))
    for key, value in model.features.state_dict().items():
        torch.testing.assert_close(features.state_dict()[key], value, rtol=0, atol=0)


def test_backbone_file_with_wrong_keys_names_file(tmp_path):
    path = os.path.join(tmp_path, "alex.pth")
    state = torchvision.models.alexnet(weights=None).state_dict()
    del state["features.0.bias"]
    torch.save(state, path)
    source = lpips_nets.resolve_backbone("alex", weights_path=path)
    with pytest.raises(checkpoints.CheckpointError, match="alex.pth.*missing keys \\[features.0.bias\\]"):
        lpips_nets.build_tap_extractor("alex", source)

    state = {f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}
    state["features.3.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, path)
    with pytest.raises(lpips_nets.LpipsWeightsError, match="shape mismatches \\[3.weight"):
        lpips_nets.build_tap_extractor("alex", source)


def test_unknown_net_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: \\['alex', 'squeeze', 'vgg'\\]"):
        lpips_nets.get_net("resnet")
