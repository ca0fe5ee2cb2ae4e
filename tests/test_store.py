"""Feature-store loading and validation: every bad input named with its fix."""

import json
import os

import numpy as np
import pytest

from engine import store


def _write_store(root, arrays, manifest=None):
    for name, (left, right) in arrays.items():
        store.write_array(os.path.join(root, name, "left.npy"), left)
        store.write_array(os.path.join(root, name, "right.npy"), right)
    if manifest is not None:
        store.write_manifest(root, manifest)
    return str(root)


def _features(rng, n=6, g=8, d=4, dtype=np.float32):
    return rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((g, d)).astype(dtype)


def test_load_sorted_order_without_manifest(tmp_path):
    rng = np.random.default_rng(0)
    root = _write_store(tmp_path, {"b": _features(rng), "a": _features(rng, dtype=np.float16)})
    features = store.load_features(root)
    assert features.names == ("a", "b")
    assert features.num_queries == 6
    assert features.num_gallery == 8


def test_load_manifest_order_and_selection(tmp_path):
    rng = np.random.default_rng(1)
    root = _write_store(tmp_path, {"b": _features(rng), "a": _features(rng), "c": _features(rng)},
                        manifest={"representations": ["c", "a", "b"]})
    assert store.load_features(root).names == ("c", "a", "b")
    assert store.load_features(root, ["b", "c"]).names == ("b", "c")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {"x": (a["x"][0][:5], a["x"][1])}, None),  # N = 5 with G = 8 is valid
        (lambda a: {"x": (a["x"][0], a["x"][1][:4])}, "fewer than left.npy's N=6"),
        (lambda a: {"x": (a["x"][0][:, :3], a["x"][1])}, "D=3 but right.npy has D=4"),
        (lambda a: {**a, "y": (a["x"][0][:5], a["x"][1])}, r"\(N, G\) = \(5, 8\)"),
        (lambda a: {"x": (a["x"][0].astype(np.float64), a["x"][1])}, "dtype float64 is not supported"),
        (lambda a: {"x": (a["x"][0][:, 0], a["x"][1])}, "expected a 2-D array"),
    ],
)
def test_shape_and_dtype_errors(tmp_path, mutate, message):
    rng = np.random.default_rng(2)
    arrays = mutate({"x": _features(rng)})
    root = _write_store(tmp_path, arrays)
    if message is None:
        store.load_features(root)
        return
    with pytest.raises(store.FeatureStoreError, match=message):
        store.load_features(root)


@pytest.mark.parametrize("value, message", [(np.nan, "non-finite value nan"), (np.inf, "non-finite value inf")])
def test_non_finite_values_name_file_and_row(tmp_path, value, message):
    rng = np.random.default_rng(3)
    left, right = _features(rng)
    right[5, 2] = value
    root = _write_store(tmp_path, {"x": (left, right)})
    with pytest.raises(store.FeatureStoreError, match=message) as error:
        store.load_features(root)
    assert os.path.join("x", "right.npy") in str(error.value)
    assert "row 5, column 2" in str(error.value)


def test_zero_row_rejected(tmp_path):
    rng = np.random.default_rng(4)
    left, right = _features(rng)
    left[3] = 0
    root = _write_store(tmp_path, {"x": (left, right)})
    with pytest.raises(store.FeatureStoreError, match="row 3 is all zeros"):
        store.load_features(root)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(store.FeatureStoreError, match="does not exist"):
        store.load_features(tmp_path / "nope")
    with pytest.raises(store.FeatureStoreError, match="contains no representation"):
        store.load_features(tmp_path)


def test_unknown_representation_lists_available(tmp_path):
    rng = np.random.default_rng(5)
    root = _write_store(tmp_path, {"x": _features(rng)})
    with pytest.raises(store.FeatureStoreError, match=r"unknown representation\(s\) \['z'\].*available: \['x'\]"):
        store.load_features(root, ["z"])


def test_missing_right_file_and_truncated_array(tmp_path):
    rng = np.random.default_rng(6)
    root = _write_store(tmp_path, {"x": _features(rng)})
    os.remove(os.path.join(root, "x", "right.npy"))
    with pytest.raises(store.FeatureStoreError, match="right.npy is missing"):
        store.load_features(root)
    left, right = _features(rng)
    store.write_array(os.path.join(root, "x", "right.npy"), right)
    path = os.path.join(root, "x", "left.npy")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(store.FeatureStoreError, match="not a readable .npy array"):
        store.load_features(root)


def test_manifest_must_be_valid_json(tmp_path):
    rng = np.random.default_rng(7)
    root = _write_store(tmp_path, {"x": _features(rng)})
    with open(os.path.join(root, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(store.FeatureStoreError, match="invalid JSON"):
        store.load_features(root)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    store.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        store.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_manifest_entry_without_directory(tmp_path):
    rng = np.random.default_rng(8)
    root = _write_store(tmp_path, {"a": _features(rng)}, manifest={"representations": ["a", "zz"]})
    with pytest.raises(store.FeatureStoreError, match="lists representation 'zz'.*remove 'zz' from the manifest"):
        store.load_features(root)


def test_arrays_api_converts_float64():
    rng = np.random.default_rng(9)
    left, right = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    features = store.features_from_arrays(["a"], [left], [right])
    assert features.left[0].dtype == np.float32
    with pytest.raises(store.FeatureStoreError, match="dtype int64 is not supported"):
        store.features_from_arrays(["a"], [left.astype(np.int64)], [right])


def test_written_files_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        store.write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "x.json").st_mode & 0o777) == 0o644
