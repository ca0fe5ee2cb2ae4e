"""`python -m benchmarks.subset_search` end to end on a tiny feature store.

Each run is a subprocess because absl flags are process-global. Expected
recall counts come from the float64 brute force in engine.reference.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine import reference, store, subsets, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.subset_search", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    features = synthetic.make_features(num_queries=40, num_gallery=52, num_members=3, dim=16, noise=1.0, seed=3)
    names = ["beta", "alpha", "gamma"]
    for name, left, right in zip(names, features.left, features.right):
        store.write_array(root / name / "left.npy", left)
        store.write_array(root / name / "right.npy", right)
    store.write_manifest(root, {"representations": names})
    return root, names, features


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    root, names, features = tiny_store
    out = tmp_path_factory.mktemp("out")
    completed = _run(f"--features_dir={root}", f"--out_dir={out}", "--ks=1,3")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, names, features


def test_cli_writes_every_output(tiny_run):
    out, _, _ = tiny_run
    for name in ("subsets.csv", "summary.json", "report.md", "single_recall.png", "best_by_size.png",
                 "participation.png", "exclusive.png"):
        assert (out / name).is_file(), name
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_cli_csv_matches_reference(tiny_run):
    out, names, features = tiny_run
    with open(out / "subsets.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:6] == ["mode", "size", "mask", "representations", "recall_at_1", "recall_at_3"]
    assert len(rows) == 2 * 7
    masks = subsets.all_masks(3)
    expected = reference.reference_search(features.left, features.right, masks, (1, 3),
                                          {"raw": None, "standardized": None})
    summary = json.loads((out / "summary.json").read_text())
    for row in rows:
        mask = int(row["mask"])
        assert row["representations"] == subsets.mask_label(mask, names)
        assert int(row["size"]) == bin(mask).count("1")
        recall = expected[row["mode"]][0][mask - 1]
        if summary["modes"][row["mode"]]["near_ties"] == 0:
            assert [int(row["recall_at_1"]), int(row["recall_at_3"])] == recall.tolist()


def test_cli_summary_contents(tiny_run):
    out, names, _ = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["representations"] == names
    assert summary["num_queries"] == 40
    assert summary["num_gallery"] == 52
    assert summary["ks"] == [1, 3]
    analyses = summary["analyses"]
    assert set(analyses["modes"]) == {"raw", "standardized"}
    raw = analyses["modes"]["raw"]
    assert [b["size"] for b in raw["best_per_size"]] == [1, 2, 3]
    assert len(raw["ablation"]) == raw["best"]["size"]
    assert len(analyses["exclusive"]) == 3
    assert analyses["oracle"] >= max(s["recall_at_1"] for s in raw["singles"])
    assert "jax" in summary["versions"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ks=1,100"], "K = 100 is larger than the gallery"),
        (["--representations=alpha,delta"], "unknown representation(s) ['delta']"),
        (["--modes=raw,zscore"], "unknown mode 'zscore'"),
        (["--subsets=alpha+omega"], "unknown representation 'omega'"),
        (["--subsets=alpha+alpha"], "'alpha' repeats in subset"),
        (["--memory_budget_gb=0"], "--memory_budget_gb must be > 0"),
        (["--confidence=2"], "--confidence must lie in (0, 1)"),
        (["--cv_folds=41"], "--cv_folds=41 is more than the 40 queries"),
    ],
)
def test_cli_rejects_bad_flags_before_work(tiny_store, tmp_path, extra, message):
    root, _, _ = tiny_store
    completed = _run(f"--features_dir={root}", f"--out_dir={tmp_path / 'out'}", *extra)
    assert completed.returncode == 1
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_nan_feature_file(tiny_store, tmp_path):
    root, names, features = tiny_store
    bad = tmp_path / "bad"
    for name, left, right in zip(names, features.left, features.right):
        left = np.array(left)
        if name == "gamma":
            left[7, 1] = np.nan
        store.write_array(bad / name / "left.npy", left)
        store.write_array(bad / name / "right.npy", right)
    completed = _run(f"--features_dir={bad}", f"--out_dir={tmp_path / 'out'}")
    assert completed.returncode == 1
    assert os.path.join("gamma", "left.npy") in completed.stderr
    assert "row 7, column 1" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_main_job_without_flags(tmp_path):
    # The README's demo command: builds the demo set, extracts every offline
    # representation into the cache, searches, and on a repeat reuses the cache.
    env = {**os.environ, "FACETS_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "benchmarks.subset_search"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "subset_search" / "summary.json").read_text())
    assert summary["representations"] == ["effnet_lite0", "color_hist", "hog", "shape_hog", "lbp", "tiny_image"]
    assert summary["num_queries"] == 216
    assert summary["num_gallery"] == 288
    report_text = (tmp_path / "out" / "subset_search" / "report.md").read_text()
    assert "synthetic" in report_text
    repeat = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    assert "already extracted" in repeat.stderr
    repeat_summary = json.loads((tmp_path / "out" / "subset_search" / "summary.json").read_text())
    assert repeat_summary["analyses"]["modes"] == summary["analyses"]["modes"]


def test_cli_rejects_out_dir_that_is_a_file(tiny_store, tmp_path):
    root, _, _ = tiny_store
    blocker = tmp_path / "out"
    blocker.write_text("not a directory")
    completed = _run(f"--features_dir={root}", f"--out_dir={blocker}")
    assert completed.returncode == 1
    assert "is an existing file" in completed.stderr
    assert blocker.read_text() == "not a directory"
