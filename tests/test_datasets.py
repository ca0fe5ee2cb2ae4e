"""Tests of the dataset layouts, the demo set and the errors for bad image files."""

import os

import numpy as np
import pytest
from PIL import Image

from extractors import datasets, demo
from extractors.datasets import DatasetError, ImageRef


def _save(path, colour, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# --- demo -------------------------------------------------------------------------


def test_demo_default_size():
    config = demo.DemoConfig()
    num_pairs = len(config.photos) * config.pairs_per_photo
    assert num_pairs >= 200
    assert num_pairs == 216
    assert num_pairs + len(config.photos) * config.distractors_per_photo == 288


def test_demo_every_photo_loads_offline():
    for name in demo.PHOTOS:
        photo = demo.load_photo(name)
        assert photo.ndim == 3, name
        assert photo.shape[2] == 3, name
        assert photo.dtype == np.uint8, name
        assert min(photo.shape[:2]) >= 150, name


def test_demo_is_deterministic(small_demo, tmp_path):
    config = demo.DemoConfig(photos=("astronaut", "coffee", "brick"), pairs_per_photo=3,
                             distractors_per_photo=1, view_size=96)
    rebuilt = demo.demo_dataset(str(tmp_path), config=config)
    assert rebuilt.left_ids == small_demo.left_ids
    assert rebuilt.right_ids == small_demo.right_ids
    assert rebuilt.fingerprint() == small_demo.fingerprint()
    for a, b in zip(rebuilt.right, small_demo.right):
        assert np.array_equal(np.asarray(datasets.load_image(a)), np.asarray(datasets.load_image(b)))


def test_demo_shape_and_views(small_demo):
    assert small_demo.num_queries == 9
    assert small_demo.num_gallery == 12
    assert all("distractor" in i for i in small_demo.right_ids[9:])
    for left, right, left_id in zip(small_demo.left, small_demo.right, small_demo.left_ids):
        a, b = np.asarray(datasets.load_image(left)), np.asarray(datasets.load_image(right))
        assert a.shape == b.shape == (96, 96, 3)
        assert not np.array_equal(a, b), left_id  # two views, not a copy


def test_demo_cache_is_reused(small_demo):
    info = os.path.join(small_demo.root, "demo.json")
    before = os.path.getmtime(info)
    config = demo.DemoConfig(photos=("astronaut", "coffee", "brick"), pairs_per_photo=3,
                             distractors_per_photo=1, view_size=96)
    again = demo.demo_dataset(os.path.dirname(small_demo.root), config=config)
    assert again.root == small_demo.root
    assert os.path.getmtime(info) == before


# --- TLL --------------------------------------------------------------------------


def test_tll_folders_pair_by_name(tmp_path):
    for name, colour in (("00002.jpg", (255, 0, 0)), ("00001.jpg", (0, 255, 0))):
        _save(str(tmp_path / "left" / name), colour)
        _save(str(tmp_path / "right" / name), colour)
    dataset = datasets.load_dataset("tll", str(tmp_path))
    assert dataset.left_ids == ("left/00001.jpg", "left/00002.jpg")
    assert dataset.right_ids == ("right/00001.jpg", "right/00002.jpg")
    assert dataset.num_gallery == 2


def test_tll_folders_missing_side(tmp_path):
    _save(str(tmp_path / "left" / "00001.png"), (1, 2, 3))
    _save(str(tmp_path / "left" / "00002.png"), (1, 2, 3))
    _save(str(tmp_path / "right" / "00001.png"), (1, 2, 3))
    with pytest.raises(DatasetError, match="right/00002.png"):
        datasets.tll(str(tmp_path))


def test_tll_empty_folder(tmp_path):
    os.makedirs(tmp_path / "left")
    os.makedirs(tmp_path / "right")
    with pytest.raises(DatasetError, match="contains no image"):
        datasets.tll(str(tmp_path))
    with pytest.raises(DatasetError, match="contains no image"):
        datasets.tll_side_by_side(str(tmp_path / "left"))


def test_tll_side_by_side_crop(tmp_path):
    pixels = np.zeros((260, 420, 3), dtype=np.uint8)
    pixels[:, :200] = (255, 0, 0)
    pixels[:, 200:400] = (0, 0, 255)
    pixels[245:] = (0, 255, 0)  # the caption strip, dropped by the default crop
    Image.fromarray(pixels).save(tmp_path / "pair.png")
    dataset = datasets.tll(str(tmp_path))
    left, right = datasets.load_image(dataset.left[0]), datasets.load_image(dataset.right[0])
    assert left.size == right.size == (200, 245)
    assert np.all(np.asarray(left) == (255, 0, 0))
    assert np.all(np.asarray(right) == (0, 0, 255))
    custom = datasets.tll_side_by_side(str(tmp_path), rows=100, width=300, split=150)
    assert datasets.load_image(custom.right[0]).size == (150, 100)


def test_tll_side_by_side_image_too_small(tmp_path):
    _save(str(tmp_path / "small.png"), (1, 2, 3), size=(300, 200))
    dataset = datasets.tll(str(tmp_path))
    with pytest.raises(DatasetError, match="small.png: is 300x200 pixels, too small"):
        datasets.load_image(dataset.left[0])


# --- pairs CSV --------------------------------------------------------------------


def test_pairs_csv_with_distractors(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png", "x.png"):
        _save(str(tmp_path / "img" / name), (len(name), 0, 0))
    (tmp_path / "pairs.csv").write_text("left,right\nimg/a.png,img/b.png\nimg/c.png,img/d.png\n,img/x.png\n")
    dataset = datasets.load_dataset("pairs", str(tmp_path))
    assert dataset.left_ids == ("img/a.png", "img/c.png")
    assert dataset.right_ids == ("img/b.png", "img/d.png", "img/x.png")
    assert dataset.right[2].path == str(tmp_path / "img" / "x.png")


def test_pairs_csv_missing_file(tmp_path):
    _save(str(tmp_path / "a.png"), (1, 2, 3))
    (tmp_path / "pairs.csv").write_text("a.png,gone.png\n")
    with pytest.raises(DatasetError, match="gone.png not found"):
        datasets.pairs_csv(str(tmp_path / "pairs.csv"))


def test_pairs_csv_missing_side(tmp_path):
    _save(str(tmp_path / "a.png"), (1, 2, 3))
    (tmp_path / "pairs.csv").write_text("a.png,\n")
    with pytest.raises(DatasetError, match="line 1: expected two cells"):
        datasets.pairs_csv(str(tmp_path))


def test_pairs_csv_empty(tmp_path):
    (tmp_path / "pairs.csv").write_text("left,right\n")
    with pytest.raises(DatasetError, match="contains no pair"):
        datasets.pairs_csv(str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="valid: \\['demo', 'tll', 'pairs'\\]"):
        datasets.load_dataset("bapps", "/tmp")


# --- bad image files --------------------------------------------------------------


def test_truncated_image(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(DatasetError, match="cut.jpg: the image is damaged or truncated"):
        datasets.load_image(ImageRef(str(path)))


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(DatasetError, match="notes.png: not a readable image file"):
        datasets.load_image(ImageRef(str(path)))


def test_missing_image_file(tmp_path):
    with pytest.raises(DatasetError, match="gone.png: image file not found"):
        datasets.load_image(ImageRef(str(tmp_path / "gone.png")))
