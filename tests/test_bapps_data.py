"""BAPPS readers, image loading, the demo set and the profile cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from engine import profile_cache
from extractors import bapps, bapps_demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bapps"))
    return bapps_demo.build_demo_set(
        root, seed=0, counts_2afc={("val", "traditional"): 3, ("val", "color"): 2}, count_jnd=3)


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_read_split_pairs_by_stem(demo_dir):
    split = bapps.read_split(demo_dir, "2afc", "val")
    # Published order, not alphabetical: traditional before color.
    assert split.names == ["traditional", "color"]
    assert len(split) == 5
    category = split.categories[0]
    assert category.stems == ("000000", "000001", "000002")
    for folder in ("ref", "p0", "p1"):
        assert [os.path.basename(p) for p in category.images[folder]] == ["000000.png", "000001.png", "000002.png"]
    assert category.labels.shape == (3,)
    # Five simulated judges: multiples of 0.2.
    np.testing.assert_allclose(category.labels * 5, np.round(category.labels * 5), atol=1e-6)


def test_read_jnd_and_detect_task(demo_dir):
    split = bapps.read_split(demo_dir, "jnd", "val", ["cnn"])
    assert split.names == ["cnn"]
    assert set(split.categories[0].images) == {"p0", "p1"}
    assert bapps.detect_task(os.path.join(demo_dir, "jnd"), "val") == "jnd"
    with pytest.raises(bapps.BappsDataError, match="pass --task"):
        bapps.detect_task(demo_dir, "val")


def test_missing_stem_is_named(tmp_path, demo_dir):
    root = _copy_tree(demo_dir, str(tmp_path / "d"))
    os.remove(os.path.join(root, "2afc", "val", "color", "p1", "000001.png"))
    with pytest.raises(bapps.BappsDataError, match=r"color/p1: no file for stem\(s\) \['000001'\]"):
        bapps.read_split(root, "2afc", "val")


@pytest.mark.parametrize("value, match", [
    (np.array([0.2, 0.4], np.float32), "expected one number"),
    (np.array([1.5], np.float32), "outside \\[0, 1\\]"),
    (np.array([-0.1], np.float32), "outside \\[0, 1\\]"),
])
def test_invalid_judge_is_named(tmp_path, demo_dir, value, match):
    root = _copy_tree(demo_dir, str(tmp_path / "d"))
    path = os.path.join(root, "2afc", "val", "traditional", "judge", "000002.npy")
    np.save(path, value)
    with pytest.raises(bapps.BappsDataError, match=f"judge/000002.npy.*{match}"):
        bapps.read_split(root, "2afc", "val")


def test_unknown_category_lists_available(demo_dir):
    with pytest.raises(bapps.BappsDataError, match="available: \\['color', 'traditional'\\]"):
        bapps.read_split(demo_dir, "2afc", "val", ["deblur"])


def test_unreadable_image_is_named(tmp_path):
    path = str(tmp_path / "broken.png")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(bapps.BappsDataError, match="broken.png: unreadable image"):
        bapps.load_images([path])


def test_load_image_matches_reference_transform(tmp_path):
    # The reference evaluation loads with PIL, converts to RGB, applies
    # torchvision Resize(64) (shorter side, bilinear), ToTensor and
    # Normalize((0.5,) * 3, (0.5,) * 3).
    rng = np.random.default_rng(0)
    path = str(tmp_path / "x.png")
    Image.fromarray(rng.integers(0, 256, (80, 120, 4), dtype=np.uint8), mode="RGBA").save(path)
    got = bapps.load_image(path)
    reference = transforms.Compose([
        transforms.Resize(64), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    expected = reference(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
    assert got.shape == (64, 96, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert torch.from_numpy(got).abs().max() <= 1.0


def test_demo_set_is_deterministic(tmp_path):
    counts = {("val", "superres"): 2}
    a = bapps_demo.build_demo_set(str(tmp_path / "a"), seed=3, counts_2afc=counts, count_jnd=0)
    b = bapps_demo.build_demo_set(str(tmp_path / "b"), seed=3, counts_2afc=counts, count_jnd=0)
    for folder in ("ref", "p0", "p1"):
        for stem in ("000000", "000001"):
            image_a = np.asarray(Image.open(os.path.join(a, "2afc/val/superres", folder, f"{stem}.png")))
            image_b = np.asarray(Image.open(os.path.join(b, "2afc/val/superres", folder, f"{stem}.png")))
            np.testing.assert_array_equal(image_a, image_b)


WHERE = ("2afc", "val", "traditional")


def test_cache_round_trip(tmp_path):
    arrays = {"profile0": np.arange(6, dtype=np.float32).reshape(2, 3)}
    fingerprint = {"dataset": "abc", "net": {"name": "alex"}}
    profile_cache.save(str(tmp_path), WHERE, "alex", fingerprint, arrays)
    loaded = profile_cache.load(str(tmp_path), WHERE, "alex", fingerprint)
    np.testing.assert_array_equal(loaded["profile0"], arrays["profile0"])
    # Another fingerprint is another entry.
    assert profile_cache.load(str(tmp_path), WHERE, "alex", {**fingerprint, "dataset": "abd"}) is None


def test_cache_rejects_corrupt_entry(tmp_path):
    fingerprint = {"dataset": "abc"}
    directory = profile_cache.save(str(tmp_path), WHERE, "alex", fingerprint,
                                   {"profile0": np.ones((2, 3), np.float32)})
    np.save(os.path.join(directory, "profile0.npy"), np.zeros((2, 3), np.float32))
    assert profile_cache.load(str(tmp_path), WHERE, "alex", fingerprint) is None

    # A rewritten meta.json whose fingerprint differs is rejected too.
    profile_cache.save(str(tmp_path), WHERE, "alex", fingerprint, {"profile0": np.ones((2, 3), np.float32)})
    meta_path = os.path.join(directory, profile_cache.META_NAME)
    with open(meta_path) as f:
        meta = json.load(f)
    meta["fingerprint"]["dataset"] = "other"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert profile_cache.load(str(tmp_path), WHERE, "alex", fingerprint) is None

    # Saving again replaces the invalid entry.
    profile_cache.save(str(tmp_path), WHERE, "alex", fingerprint, {"profile0": np.ones((2, 3), np.float32)})
    assert profile_cache.load(str(tmp_path), WHERE, "alex", fingerprint) is not None


def test_cache_save_failure_keeps_old_entry(tmp_path, monkeypatch):
    fingerprint = {"dataset": "abc"}
    good = {"profile0": np.ones((2, 3), np.float32)}
    profile_cache.save(str(tmp_path), WHERE, "alex", fingerprint, good)

    real_write = profile_cache.store.write_array

    def fail_on_second_array(path, array):
        if path.endswith("profile1.npy"):
            raise OSError("simulated failure while writing")
        real_write(path, array)

    monkeypatch.setattr(profile_cache.store, "write_array", fail_on_second_array)
    with pytest.raises(OSError, match="simulated failure"):
        profile_cache.save(str(tmp_path), WHERE, "alex", fingerprint,
                           {"profile0": np.zeros((2, 3), np.float32), "profile1": np.zeros((2, 3), np.float32)})
    monkeypatch.undo()
    loaded = profile_cache.load(str(tmp_path), WHERE, "alex", fingerprint)
    np.testing.assert_array_equal(loaded["profile0"], good["profile0"])
    assert set(loaded) == {"profile0"}
    leftovers = [e for e in os.listdir(os.path.join(tmp_path, *WHERE)) if e.startswith(".")]
    assert leftovers == []
