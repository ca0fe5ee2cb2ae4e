"""Tests of prepare_features: the store it writes, reuse, resume and errors that keep finished work."""

import dataclasses
import json
import os

import numpy as np
import pytest

from engine import store
from extractors import checkpoints, classical, datasets, pipeline, registry

CHEAP = "color_hist,tiny_image"


def _manifest(features_dir):
    with open(os.path.join(features_dir, "manifest.json")) as f:
        return json.load(f)


def _extract_directly(name, dataset):
    # Reference: the extractor applied image by image, without the pipeline.
    extractor = registry.get(name).build()
    rows = [extractor.preprocess(datasets.load_image(r)) for r in (*dataset.left, *dataset.right)]
    return extractor.embed(np.stack(rows))


def test_store_contents(small_demo, tmp_path):
    out = pipeline.prepare_features(dataset=small_demo, representations=CHEAP, features_dir=str(tmp_path / "f"))
    features = store.load_features(out)
    assert features.names == ("color_hist", "tiny_image")
    assert (features.num_queries, features.num_gallery) == (9, 12)
    for name, left, right in zip(features.names, features.left, features.right):
        expected = _extract_directly(name, small_demo)
        np.testing.assert_array_equal(np.concatenate([left, right]), expected)
    manifest = _manifest(out)
    assert manifest["dataset"]["fingerprint"] == small_demo.fingerprint()
    assert manifest["dataset"]["left_ids"] == list(small_demo.left_ids)
    record = manifest["extractors"]["tiny_image"]
    assert record["extractor"]["name"] == "tiny_image"
    assert record["preprocessing"]["resize"] == [16, 16]
    assert record["output_dim"] == registry.get("tiny_image").output_dim
    assert "created" in record
    assert not any(n.startswith(".partial") for n in os.listdir(os.path.join(out, "tiny_image")))


def test_workers_give_same_features(small_demo, tmp_path):
    out = pipeline.prepare_features(dataset=small_demo, representations="hog", features_dir=str(tmp_path),
                                    num_workers=2, batch_size=4)
    features = store.load_features(out)
    np.testing.assert_array_equal(np.concatenate([features.left[0], features.right[0]]),
                                  _extract_directly("hog", small_demo))


def test_cli_lists_representations():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "benchmarks.extract_features", "--list_representations"],
                            capture_output=True, text=True, check=True, timeout=120)
    for name in registry.names("offline"):
        assert name in result.stdout


def test_rerun_reuses_store(small_demo, tmp_path, monkeypatch):
    out = pipeline.prepare_features(dataset=small_demo, representations=CHEAP, features_dir=str(tmp_path / "f"))

    def fail(*args, **kwargs):
        raise AssertionError("extract_representation ran although the store is complete")

    monkeypatch.setattr(pipeline, "extract_representation", fail)
    assert pipeline.prepare_features(dataset=small_demo, representations=CHEAP, features_dir=out) == out


def test_resume_after_failed_representation(small_demo, tmp_path, monkeypatch):
    out = str(tmp_path / "f")
    broken = dataclasses.replace(registry.get("tiny_image"), builder=_raise_interrupt)
    monkeypatch.setitem(registry._REGISTRY, "tiny_image", broken)
    with pytest.raises(KeyboardInterrupt):
        pipeline.prepare_features(dataset=small_demo, representations=CHEAP, features_dir=out)
    assert _manifest(out)["representations"] == ["color_hist"]
    first = _manifest(out)["extractors"]["color_hist"]["created"]

    monkeypatch.undo()
    pipeline.prepare_features(dataset=small_demo, representations=CHEAP, features_dir=out)
    manifest = _manifest(out)
    assert manifest["representations"] == ["color_hist", "tiny_image"]
    assert manifest["extractors"]["color_hist"]["created"] == first
    store.load_features(out)


def _raise_interrupt(representation, options):
    raise KeyboardInterrupt


def test_resume_within_representation(small_demo, tmp_path, monkeypatch):
    out = str(tmp_path / "f")
    monkeypatch.setattr(pipeline, "CHUNK_SIZE", 5)
    original_embed = classical.DescriptorExtractor.embed
    calls = []

    def embed_then_fail(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted in the second chunk
        return original_embed(self, batch)

    monkeypatch.setattr(classical.DescriptorExtractor, "embed", embed_then_fail)
    with pytest.raises(KeyboardInterrupt):
        pipeline.prepare_features(dataset=small_demo, representations="tiny_image", features_dir=out,
                                  batch_size=5)
    directory = os.path.join(out, "tiny_image")
    assert not os.path.exists(os.path.join(directory, "left.npy"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    partial = [n for n in os.listdir(directory) if n.startswith(".partial-")]
    assert len(partial) == 1
    chunks = os.listdir(os.path.join(directory, partial[0]))
    assert len(chunks) == 1
    assert chunks[0].startswith("chunk-000000000-")

    monkeypatch.setattr(classical.DescriptorExtractor, "embed", original_embed)
    pipeline.prepare_features(dataset=small_demo, representations="tiny_image", features_dir=out, batch_size=5)
    record = _manifest(out)["extractors"]["tiny_image"]
    assert record["images_computed"] == 21 - 5
    features = store.load_features(out)
    np.testing.assert_array_equal(np.concatenate([features.left[0], features.right[0]]),
                                  _extract_directly("tiny_image", small_demo))


def test_bad_image_keeps_finished_work(small_demo, tmp_path):
    out = str(tmp_path / "f")
    pipeline.prepare_features(dataset=small_demo, representations="color_hist", features_dir=out)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = dataclasses.replace(small_demo, right=(*small_demo.right[:-1], datasets.ImageRef(str(bad))))
    with pytest.raises(datasets.DatasetError, match="bad.jpg: the image is damaged or truncated"):
        pipeline.prepare_features(dataset=dataset, representations="color_hist", features_dir=str(tmp_path / "g"))
    features = store.load_features(out)
    assert features.names == ("color_hist",)


def test_replaced_image_recomputes_its_chunk(small_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_SIZE", 5)
    out = str(tmp_path / "f")
    bad = tmp_path / "last.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    last = small_demo.right[-1]
    dataset = dataclasses.replace(small_demo, right=(*small_demo.right[:-1], datasets.ImageRef(str(bad))))
    with pytest.raises(datasets.DatasetError, match="last.jpg"):
        pipeline.prepare_features(dataset=dataset, representations="tiny_image", features_dir=out, batch_size=5)

    with open(last.path, "rb") as f:
        bad.write_bytes(f.read())  # the user replaces the damaged file
    pipeline.prepare_features(dataset=dataset, representations="tiny_image", features_dir=out, batch_size=5)
    # 21 images in chunks of 5: the first four chunks were kept, only the image 20 chunk is new.
    assert _manifest(out)["extractors"]["tiny_image"]["images_computed"] == 1
    features = store.load_features(out)
    np.testing.assert_array_equal(np.concatenate([features.left[0], features.right[0]]),
                                  _extract_directly("tiny_image", small_demo))


def test_changed_dataset_in_same_place_is_extracted_again(small_demo, tmp_path):
    out = str(tmp_path / "f")
    image = tmp_path / "changing.jpg"
    with open(small_demo.right[-1].path, "rb") as f:
        image.write_bytes(f.read())
    dataset = dataclasses.replace(small_demo, right=(*small_demo.right[:-1], datasets.ImageRef(str(image))))
    pipeline.prepare_features(dataset=dataset, representations="tiny_image", features_dir=out)
    with open(small_demo.right[0].path, "rb") as f:
        image.write_bytes(f.read())
    pipeline.prepare_features(dataset=dataset, representations="tiny_image", features_dir=out)
    assert _manifest(out)["dataset"]["fingerprint"] == dataset.fingerprint()
    right = store.load_features(out).right[0]
    np.testing.assert_array_equal(right[-1], right[0])


def test_bad_image_in_worker_names_file(small_demo, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    dataset = dataclasses.replace(small_demo, right=(*small_demo.right[:-1], datasets.ImageRef(str(bad))))
    with pytest.raises(Exception, match="bad.png: not a readable image file"):
        pipeline.prepare_features(dataset=dataset, representations="color_hist", features_dir=str(tmp_path / "f"),
                                  num_workers=1)


def test_store_of_other_dataset_is_rejected(small_demo, tmp_path):
    out = pipeline.prepare_features(dataset=small_demo, representations="color_hist", features_dir=str(tmp_path))
    other = small_demo.subset(4)
    with pytest.raises(pipeline.ExtractionError, match="Pass another --features_dir"):
        pipeline.prepare_features(dataset=other, representations="color_hist", features_dir=out)


def test_unknown_representation(small_demo, tmp_path):
    with pytest.raises(KeyError, match="valid names"):
        pipeline.prepare_features(dataset=small_demo, representations="color_hist,colour_hist",
                                  features_dir=str(tmp_path))


def test_missing_weights_skipped_in_group_only(small_demo, tmp_path, monkeypatch):
    absent = dataclasses.replace(
        registry.get("effnet_lite0"), name="absent_for_test", groups=("offline",),
        weights=registry.WeightsSource(file_name="absent.pth", url="https://example.org/absent.pth"))
    monkeypatch.setitem(registry._REGISTRY, "absent_for_test", absent)
    chosen = pipeline.select_representations("offline", str(tmp_path))
    assert "absent_for_test" not in [e.name for e in chosen]
    assert "color_hist" in [e.name for e in chosen]
    with pytest.raises(checkpoints.MissingWeightsError, match="https://example.org/absent.pth"):
        pipeline.select_representations("color_hist,absent_for_test", str(tmp_path))


def test_changed_config_is_extracted_again(small_demo, tmp_path, monkeypatch):
    out = pipeline.prepare_features(dataset=small_demo, representations="color_hist", features_dir=str(tmp_path))
    changed = dataclasses.replace(registry.get("color_hist"), config=(("bins", 8), ("variant", "test")))
    monkeypatch.setitem(registry._REGISTRY, "color_hist", changed)
    pipeline.prepare_features(dataset=small_demo, representations="color_hist", features_dir=out)
    assert _manifest(out)["extractors"]["color_hist"]["extractor"]["config"]["variant"] == "test"


def test_default_features_dir_is_keyed_by_dataset(small_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "FEATURES_CACHE_DIR", str(tmp_path))
    out = pipeline.prepare_features(dataset=small_demo, representations="color_hist")
    assert out == str(tmp_path / f"demo-{small_demo.fingerprint()[:12]}")
    assert store.load_features(out).names == ("color_hist",)
