"""Retrieval representations as BAPPS metrics: `--retrieval_metrics` of `python -m benchmarks.bapps_2afc`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import bapps_2afc
from engine import bapps_pipeline
from extractors import bapps, bapps_demo, checkpoints, lpips_nets, registry
from tests.test_bapps_cli import _read_csv, _run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bapps_retrieval"))
    return bapps_demo.build_demo_set(
        root, seed=2, counts_2afc={("val", "traditional"): 4, ("val", "superres"): 3, ("train", "mix"): 5},
        count_jnd=3)


def _summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _hand_distances(data_dir: str, name: str, category: str, stems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """1 - cosine of the extractor's embeddings of the patch files, read with PIL, computed in numpy."""
    extractor = registry.get(name).build(registry.BuildOptions())
    root = os.path.join(data_dir, "2afc", "val", category)

    def embed(folder: str) -> np.ndarray:
        rows = []
        for stem in stems:
            with Image.open(os.path.join(root, folder, f"{stem}.png")) as image:
                item = extractor.preprocess(image.convert("RGB"))
            batch = item[None] if isinstance(item, torch.Tensor) else np.stack([item])
            rows.append(np.asarray(extractor.embed(batch), np.float64)[0])
        return np.stack(rows)

    ref, p0, p1 = embed("ref"), embed("p0"), embed("p1")

    def distance(a, b):
        return np.array([1.0 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)])

    return distance(ref, p0), distance(ref, p1)


def test_cosine_distance_matches_brute_force_and_zero_vectors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    a[1] = b[1] * 3.0  # Same direction: distance 0.
    a[2] = -b[2]  # Opposite: distance 2.
    a[3] = 0.0  # Zero vector: cosine taken as 0.
    expected = [1.0 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) if np.linalg.norm(x) else 1.0
                for x, y in zip(a, b)]
    got = bapps_pipeline.cosine_distance(a, b)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[1] == pytest.approx(0.0, abs=1e-12)
    assert got[2] == pytest.approx(2.0)


def test_retrieval_metrics_scored_searched_and_cached(tmp_path, data_dir, monkeypatch):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    common = (f"--data_dir={data_dir}", "--task=2afc", "--nets=alex", "--fit_split=", "--bootstrap_resamples=0",
              f"--cache_dir={cache}", "--select_on=train", "--retrieval_metrics=color_hist,tiny_image")
    _run(*common, f"--out_dir={out}")

    rows = _read_csv(os.path.join(out, "distances.csv"))
    for name in ("color_hist", "tiny_image"):
        for category in ("traditional", "superres"):
            mine = [r for r in rows if r["metric"] == name and r["category"] == category]
            d0, d1 = _hand_distances(data_dir, name, category, [r["stem"] for r in mine])
            np.testing.assert_allclose([float(r["d0"]) for r in mine], d0, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose([float(r["d1"]) for r in mine], d1, rtol=1e-5, atol=1e-6)

    score_metrics = {r["metric"] for r in _read_csv(os.path.join(out, "scores.csv"))}
    assert {"color_hist", "tiny_image", "alex-lin", "ssim"} <= score_metrics
    summary = _summary(out)
    assert set(summary["config"]["retrieval_metrics"]) == {"color_hist", "tiny_image"}
    # The default search covers the LPIPS and baseline metrics plus every retrieval metric.
    assert summary["combinations"]["metrics"] == ["alex-lin", "alex", "l2-lab", "l2-rgb", "ssim", "color_hist",
                                                  "tiny_image"]
    assert summary["combinations"]["num_subsets"] == 2 ** 7 - 1
    assert summary["held_out_selection"]["train_split"] == "train"
    report = open(os.path.join(out, "report.md")).read()
    assert "color_hist" in report
    computed = summary["cache"]["computed"]
    assert any(c.endswith("val/superres/embedding-tiny_image") for c in computed)
    assert any(c.endswith("train/mix/embedding-color_hist") for c in computed)

    # A re-run reads every embedding from the cache and builds no extractor.
    def no_build(*args, **kwargs):
        raise AssertionError("an extractor was built although every embedding is cached")

    monkeypatch.setattr(registry.Representation, "build", no_build)
    monkeypatch.setattr(lpips_nets, "build_tap_extractor", no_build)
    out2 = str(tmp_path / "out2")
    _run(*common, f"--out_dir={out2}", "--search_metrics=tiny_image,alex-lin")
    summary2 = _summary(out2)
    assert summary2["cache"]["computed"] == []
    assert summary2["scores"]["tiny_image"] == summary["scores"]["tiny_image"]
    assert summary2["combinations"]["metrics"] == ["tiny_image", "alex-lin"]


def test_effnet_lite0_metric(tmp_path, data_dir):
    out = str(tmp_path / "out")
    _run(f"--data_dir={data_dir}", "--task=2afc", "--nets=alex", "--fit_split=", "--bootstrap_resamples=0",
         "--cache_dir=", "--select_on=cv", "--cv_folds=0", "--retrieval_metrics=effnet_lite0",
         "--search_metrics=effnet_lite0,alex-lin", f"--out_dir={out}")
    rows = [r for r in _read_csv(os.path.join(out, "distances.csv"))
            if r["metric"] == "effnet_lite0" and r["category"] == "superres"]
    assert len(rows) == 3
    d0, d1 = _hand_distances(data_dir, "effnet_lite0", "superres", [r["stem"] for r in rows])
    np.testing.assert_allclose([float(r["d0"]) for r in rows], d0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([float(r["d1"]) for r in rows], d1, rtol=1e-4, atol=1e-5)
    assert _summary(out)["combinations"]["metrics"] == ["effnet_lite0", "alex-lin"]


def test_jnd_retrieval_metric(tmp_path, data_dir):
    out = str(tmp_path / "out")
    _run(f"--data_dir={data_dir}", "--task=jnd", "--nets=alex", "--cache_dir=", "--retrieval_metrics=tiny_image",
         f"--out_dir={out}")
    rows = [r for r in _read_csv(os.path.join(out, "distances.csv")) if r["metric"] == "tiny_image"]
    assert len(rows) == 6 and all(0.0 <= float(r["d"]) <= 2.0 for r in rows)
    assert "tiny_image" in _summary(out)["scores"]


def test_unknown_and_missing_representations(tmp_path, data_dir, capsys):
    with pytest.raises(KeyError, match="unknown representation 'no_such_rep'"):
        _run(f"--data_dir={data_dir}", "--task=2afc", f"--out_dir={tmp_path}", "--cache_dir=",
             "--retrieval_metrics=no_such_rep")
    with pytest.raises(checkpoints.MissingWeightsError, match="weights for 'ret' not found"):
        _run(f"--data_dir={data_dir}", "--task=2afc", f"--out_dir={tmp_path}", "--cache_dir=",
             f"--weights_dir={tmp_path}", "--retrieval_metrics=ret")
    with pytest.raises(SystemExit) as exit_info:
        _run(f"--data_dir={data_dir}", "--task=2afc", f"--out_dir={tmp_path}", "--cache_dir=",
             f"--weights_dir={tmp_path}", "--retrieval_metrics=ret",
             entry_point=lambda: bapps_2afc.main(["bapps_2afc"]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: weights for 'ret' not found")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_embedding_runner_round_trips_patches(data_dir):
    # The patch as loaded ([-1, 1]) goes back to the exact 8-bit pixels of the file.
    split = bapps.read_split(data_dir, "2afc", "val", ["superres"])
    path = split.categories[0].images["ref"][0]
    runner = bapps.embedding_runner(registry.get("tiny_image"), registry.BuildOptions())
    got = runner.make_embed()(bapps.load_images([path]))
    extractor = registry.get("tiny_image").build(registry.BuildOptions())
    with Image.open(path) as image:
        expected = extractor.embed(np.stack([extractor.preprocess(image.convert("RGB"))]))
    np.testing.assert_array_equal(got, expected)
    assert runner.name == "tiny_image"
    assert runner.fingerprint["representation"] == registry.get("tiny_image").fingerprint()
