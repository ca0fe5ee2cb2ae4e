"""End-to-end runs of `python -m benchmarks.bapps_2afc` on a tiny generated BAPPS set."""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from absl import flags

from benchmarks import bapps_2afc
from engine import scores
from extractors import bapps, bapps_demo, lpips_nets

FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bapps"))
    return bapps_demo.build_demo_set(
        root, seed=1,
        counts_2afc={("val", "traditional"): 4, ("val", "superres"): 3, ("train", "mix"): 6},
        count_jnd=4)


def _run(*args: str, entry_point=None) -> None:
    """Run the CLI's work in-process with these flags; errors propagate as exceptions."""
    FLAGS.unparse_flags()
    FLAGS(["bapps_2afc", "--nets=alex,squeeze", "--random_backbone_seed=0", "--fit_steps=20",
           "--batch_size=4", *args])
    try:
        (entry_point or bapps_2afc._run)()
    finally:
        FLAGS.unparse_flags()


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tree_digest(directory: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def test_2afc_run_writes_outputs_and_reuses_cache(tmp_path, data_dir, monkeypatch):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    # The task folder itself as --data_dir: the task is detected from its name.
    _run(f"--data_dir={data_dir}/2afc", f"--out_dir={out}", f"--cache_dir={cache}")

    rows = _read_csv(os.path.join(out, "distances.csv"))
    assert list(rows[0]) == ["split", "category", "stem", "metric", "d0", "d1", "judge"]
    metrics = {r["metric"] for r in rows}
    assert {"alex-lin", "alex", "alex-l2", "squeeze-l6", "l2-lab", "l2-rgb", "ssim"} <= metrics
    assert len(rows) == 7 * len(metrics)

    # scores.csv agrees with the 2AFC rule applied to distances.csv.
    alex_lin = [r for r in rows if r["metric"] == "alex-lin" and r["category"] == "traditional"]
    expected = 100 * scores.two_afc_scores_reference(
        [float(r["d0"]) for r in alex_lin], [float(r["d1"]) for r in alex_lin],
        [float(r["judge"]) for r in alex_lin]).mean()
    score_rows = {(r["metric"], r["category"]): float(r["score"]) for r in _read_csv(os.path.join(out, "scores.csv"))}
    assert score_rows[("alex-lin", "traditional")] == pytest.approx(expected, abs=1e-4)
    assert ("alex-lin", "mean_of_categories") in score_rows
    assert ("alex-lin", "pooled_over_triplets") in score_rows

    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["config"]["random_backbones"] == ["alex", "squeeze"]
    assert summary["cache"]["loaded"] == []
    assert len(summary["fitted_weightings"]) == 4
    assert "single_layer" in summary
    assert "bootstrap_intervals" in summary
    assert "combinations" in summary
    # A train split exists, so the held-out choice is made on train and scored on val.
    selection = summary["held_out_selection"]
    assert selection["train_split"] == "train"
    held = selection["combinations"]["raw"]["mean_of_categories"]["overall"]
    assert held["in_sample_best"]["score"] >= held["held_out"]
    assert set(selection["single_taps"]) == {"alex", "squeeze"}
    comparisons = summary["paired_comparisons"]
    assert "sign test" in comparisons["test"]
    assert len(comparisons["metrics"]) == len(summary["scores"])
    assert comparisons["combinations"]["standardized"][0]["reference"]
    report = open(os.path.join(out, "report.md")).read()
    assert "RANDOM backbone weights" in report
    assert "## Metric combinations" in report
    assert "## Held-out selection" in report
    assert "## Paired comparisons" in report

    # A second run with other analysis settings reads every profile from the
    # cache and never builds a network.
    def no_network(*args, **kwargs):
        raise AssertionError("the network was built although every profile is cached")

    monkeypatch.setattr(lpips_nets, "build_tap_extractor", no_network)
    out2 = str(tmp_path / "out2")
    _run(f"--data_dir={data_dir}/2afc", f"--out_dir={out2}", f"--cache_dir={cache}", "--l1=0.01",
         "--search_metrics=alex-lin,ssim", "--select_on=cv", "--cv_folds=3", "--confidence=0.9")
    with open(os.path.join(out2, "summary.json")) as f:
        summary2 = json.load(f)
    assert summary2["cache"]["computed"] == []
    assert summary2["scores"] == summary["scores"]
    selection = summary2["held_out_selection"]
    assert "3-fold cross-validation" in selection["method"]
    cv = selection["combinations"]["raw"]["pooled_over_triplets"]["overall"]
    assert sum(c["folds"] for c in cv["times_chosen"]) == 3
    assert summary2["paired_comparisons"]["level"] == 0.9
    assert "cross-validated" in open(os.path.join(out2, "report.md")).read()


def test_bad_judge_fails_and_keeps_cache(tmp_path, data_dir):
    import shutil

    data = shutil.copytree(data_dir, str(tmp_path / "data"))
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    _run(f"--data_dir={data}", f"--out_dir={out}", f"--cache_dir={cache}", "--fit_split=", "--task=2afc",
         "--select_on=cv")
    before = _tree_digest(cache)

    bad = os.path.join(data, "2afc", "val", "superres", "judge", "000001.npy")
    np.save(bad, np.array([2.0], np.float32))
    with pytest.raises(bapps.BappsDataError, match="superres/judge/000001.npy: value 2.0 is outside"):
        _run(f"--data_dir={data}", f"--out_dir={out}", f"--cache_dir={cache}", "--fit_split=", "--task=2afc",
         "--select_on=cv")
    assert _tree_digest(cache) == before


def test_jnd_run_scores_average_precision(tmp_path, data_dir):
    out = str(tmp_path / "out")
    _run(f"--data_dir={data_dir}", "--task=jnd", f"--out_dir={out}", "--cache_dir=")
    rows = _read_csv(os.path.join(out, "distances.csv"))
    assert list(rows[0]) == ["split", "category", "stem", "metric", "d", "same"]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["task"] == "jnd"
    assert set(summary["scores"]["alex-lin"]["categories"]) == {"traditional", "cnn"}
    assert summary["scores"]["alex-lin"]["pooled_over_triplets"] is None


def test_mismatched_backbone_file_is_named(tmp_path, data_dir):
    path = str(tmp_path / "alex_wrong.pth")
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    with pytest.raises(lpips_nets.LpipsWeightsError, match="alex_wrong.pth: the weights do not match"):
        _run(f"--data_dir={data_dir}", "--task=2afc", f"--out_dir={tmp_path / 'out'}", "--cache_dir=",
             f"--backbone_weights=alex={path}")


def test_unknown_net_and_category(tmp_path, data_dir):
    with pytest.raises(ValueError, match="unknown LPIPS net 'resnet'"):
        _run(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--nets=resnet")
    with pytest.raises(bapps.BappsDataError, match="unknown category \\['deblur'\\]"):
        _run(f"--data_dir={data_dir}", "--task=2afc", f"--out_dir={tmp_path}", "--categories=deblur",
             "--cache_dir=")


def test_main_reports_errors_in_one_line(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--nets=resnet",
             entry_point=lambda: bapps_2afc.main(["bapps_2afc"]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown LPIPS net 'resnet'")
    assert "Traceback" not in err
