"""Held-out selection, bootstrap intervals and paired tests (engine.statistics, engine.search_statistics).

Expected values come from loop references beside each vectorised function,
from scipy.stats.binomtest (scipy 1.17) and exact integer binomial sums for
the McNemar test, and from simulated data with a known true value for the
interval coverage.
"""

import math

import numpy as np
import pytest
import scipy.stats

from engine import analysis, retrieval, search_statistics, similarity, statistics, subsets, synthetic


def _masks(count):
    return np.arange(1, count + 1, dtype=np.int64)


# ----------------------------------------------------------------------------
# Folds.


def test_folds_balanced_and_seeded():
    folds = statistics.assign_folds(103, 5, seed=3)
    counts = np.bincount(folds, minlength=5)
    assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(folds, statistics.assign_folds(103, 5, seed=3))
    assert not np.array_equal(folds, statistics.assign_folds(103, 5, seed=4))


def test_folds_keep_strata_proportions():
    strata = np.repeat([0, 1, 2], [50, 30, 20])
    folds = statistics.assign_folds(100, 5, seed=0, strata=strata)
    for stratum, size in enumerate([50, 30, 20]):
        counts = np.bincount(folds[strata == stratum], minlength=5)
        assert counts.min() >= size // 5
        assert counts.max() <= -(-size // 5)


@pytest.mark.parametrize("num_items, num_folds", [(5, 1), (3, 4)])
def test_folds_reject_bad_counts(num_items, num_folds):
    with pytest.raises(ValueError, match="folds"):
        statistics.assign_folds(num_items, num_folds, seed=0)


@pytest.mark.parametrize("num_subsets, num_queries, num_folds, k_max, dtype",
                         [(1, 2, 2, 1, np.uint8), (7, 50, 3, 10, np.uint8), (33, 211, 5, 300, np.uint16)])
def test_rank_fold_counts_match_loop(num_subsets, num_queries, num_folds, k_max, dtype):
    rng = np.random.default_rng(num_subsets)
    ranks = rng.integers(0, k_max + 1, size=(num_subsets, num_queries)).astype(dtype)
    folds = statistics.assign_folds(num_queries, num_folds, seed=1)
    ks = sorted({1, max(1, k_max // 2), k_max})
    np.testing.assert_array_equal(statistics.rank_fold_counts(ranks, folds, num_folds, ks),
                                  statistics.rank_fold_counts_reference(ranks, folds, num_folds, ks))


# ----------------------------------------------------------------------------
# Cross-validation.


def test_cross_validation_matches_reference():
    rng = np.random.default_rng(0)
    values = (rng.random((40, 300, 2)) < rng.uniform(0.2, 0.4, (40, 1, 1))).astype(np.int64)
    values[..., 1] |= values[..., 0]
    masks = _masks(40)
    sizes = subsets.popcount(masks)
    folds = statistics.assign_folds(300, 4, seed=2)
    totals = np.stack([values[:, folds == f].sum(axis=1) for f in range(4)], axis=1)
    groups = {"overall": np.arange(40), "size_2": np.flatnonzero(sizes == 2)}
    cv = statistics.cross_validate(totals, masks, groups, folds=folds)
    for g, rows in enumerate(groups.values()):
        chosen, held = statistics.cross_validate_reference(values, folds, 4, masks, rows)
        np.testing.assert_array_equal(cv.chosen[g], chosen)
        np.testing.assert_array_equal(cv.held_out[g], held)
    np.testing.assert_array_equal(cv.fold_sizes, np.bincount(folds))


def test_cross_validation_ignores_held_out_items():
    # Rewriting the held-out fold's outcomes must leave that fold's choice unchanged.
    rng = np.random.default_rng(1)
    values = (rng.random((25, 200)) < 0.3).astype(np.int64)
    folds = statistics.assign_folds(200, 5, seed=0)
    groups = {"overall": np.arange(25)}
    base = statistics.cross_validate(statistics.fold_totals(values, folds, 5)[..., None], _masks(25), groups,
                                     folds=folds)
    for fold in range(5):
        changed = values.copy()
        changed[:, folds == fold] = rng.random((25, int((folds == fold).sum()))) < 0.9
        other = statistics.cross_validate(statistics.fold_totals(changed, folds, 5)[..., None], _masks(25), groups,
                                          folds=folds)
        assert other.chosen[0, fold] == base.chosen[0, fold]


def test_cross_validation_not_fooled_by_lucky_subset():
    # Row 1 recalls every query of fold 0 and nothing else (a lucky fit); row 0
    # recalls 40% of every fold. In-sample selection takes the lucky row; with
    # fold 0 held out the choice is made on folds where row 1 recalls nothing.
    folds = np.repeat([0, 1], 100)
    values = np.zeros((2, 200), np.int64)
    values[0, np.arange(200) % 5 < 2] = 1
    values[1, folds == 0] = 1
    cv = statistics.cross_validate(statistics.fold_totals(values, folds, 2)[..., None], _masks(2),
                                   {"overall": np.arange(2)}, folds=folds)
    assert cv.in_sample[0] == 1
    np.testing.assert_array_equal(cv.chosen[0], [0, 1])
    # Held-out: row 0 on fold 0 (40 queries), row 1 on fold 1 (nothing).
    assert cv.totals()[0, 0] == 40


def test_cross_validation_unbiased_under_noise():
    # 300 subsets, all with true recall 0.3 on 1,000 queries: the in-sample
    # best is inflated by the maximum of 300 noisy counts (sd about 14.5),
    # while each held-out count is an unbiased draw.
    rng = np.random.default_rng(7)
    values = (rng.random((300, 1000)) < 0.3).astype(np.int64)
    folds = statistics.assign_folds(1000, 5, seed=0)
    cv = statistics.cross_validate(statistics.fold_totals(values, folds, 5)[..., None], _masks(300),
                                   {"overall": np.arange(300)}, folds=folds)
    in_sample = values.sum(axis=1).max()
    assert in_sample - 300 > 30
    assert abs(cv.totals()[0, 0] - 300) < 4 * math.sqrt(1000 * 0.3 * 0.7)


def test_select_on_split_reports_train_choice():
    train = np.array([[0.6], [0.7], [0.65]])
    test = np.array([[0.66], [0.61], [0.64]])
    out = statistics.select_on_split(train, test, _masks(3), {"overall": np.arange(3)})["overall"]
    assert out["chosen_row"] == 1
    assert out["test"] == [0.61]
    assert out["test_best_row"] == 0


# ----------------------------------------------------------------------------
# Bootstrap.


@pytest.mark.parametrize("binary", [True, False])
def test_resample_totals_match_loop(binary):
    rng = np.random.default_rng(3)
    values = rng.random((4, 90))
    if binary:
        values = (values < 0.4).astype(np.uint8)
    strata = np.repeat([0, 1, 2], 30)
    resamples = statistics.resample_totals(values, num_resamples=70, seed=5, strata=strata)
    expected = statistics.resample_totals_reference(values, num_resamples=70, seed=5, strata=strata)
    np.testing.assert_allclose(resamples.samples, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(resamples.estimate, np.asarray(values, np.float64).sum(axis=1))


def test_resample_counts_keep_strata_sizes():
    strata = np.repeat([0, 1], [7, 13])
    counts = statistics.resample_counts(20, 100, seed=0, strata=strata)
    np.testing.assert_array_equal(counts[:, :7].sum(axis=1), 7)
    np.testing.assert_array_equal(counts[:, 7:].sum(axis=1), 13)


def test_resamples_independent_of_memory_budget():
    values = (np.random.default_rng(0).random((3, 500)) < 0.5).astype(np.uint8)
    small = statistics.resample_totals(values, num_resamples=300, seed=1, memory_budget_gb=1e-6)
    large = statistics.resample_totals(values, num_resamples=300, seed=1, memory_budget_gb=1.0)
    np.testing.assert_array_equal(small.samples, large.samples)


def _binomial_band(trials, rate):
    # Three standard deviations of a Binomial(trials, rate) count.
    spread = 3 * math.sqrt(trials * rate * (1 - rate))
    return trials * rate - spread, trials * rate + spread


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_interval_coverage_on_simulated_recall(level):
    # 200 simulated datasets of N = 400 queries recalled with probability 0.3;
    # the true recall count is 120. The number of intervals that contain it
    # is Binomial(200, level) for an exact method.
    rng = np.random.default_rng(11)
    covered = 0
    for dataset in range(200):
        outcomes = rng.random(400) < 0.3
        low, high = statistics.resample_totals(outcomes, num_resamples=400, level=level, seed=dataset).interval()
        covered += bool(low[0] <= 120 <= high[0])
    lowest, highest = _binomial_band(200, level)
    assert lowest <= covered <= highest


def test_paired_difference_coverage():
    # Two subsets on the same 500 queries: A recalls with probability 0.35.
    # B loses 10% of A's recalled queries and gains 5% of the others, so the
    # true difference A - B is 500 * (0.1 * 0.35 - 0.05 * 0.65) = 1.25 queries.
    rng = np.random.default_rng(12)
    covered = 0
    for dataset in range(200):
        a = rng.random(500) < 0.35
        u = rng.random(500)
        b = a.copy()
        b[(u < 0.10) & a] = False
        b[(u > 0.95) & ~a] = True
        truth = 500 * (0.1 * 0.35 - 0.05 * 0.65)
        resamples = statistics.resample_totals(np.stack([a, b]), num_resamples=400, level=0.9, seed=dataset)
        _, low, high = resamples.difference([0], 1)
        covered += bool(low[0] <= truth <= high[0])
    lowest, highest = _binomial_band(200, 0.9)
    assert lowest <= covered <= highest


def test_interval_coverage_with_strata_and_fractional_scores():
    # 2AFC-like: per-triplet scores h or 1 - h in two categories of different
    # difficulty; the true pooled mean is known from the simulation.
    rng = np.random.default_rng(13)
    strata = np.repeat([0, 1], [150, 250])
    truth = 150 * (0.8 * 0.7 + 0.2 * 0.3) + 250 * (0.6 * 0.7 + 0.4 * 0.3)
    covered = 0
    for dataset in range(200):
        correct = rng.random(400) < np.where(strata == 0, 0.8, 0.6)
        scores = np.where(correct, 0.7, 0.3)
        low, high = statistics.resample_totals(scores, num_resamples=400, level=0.9, seed=dataset,
                                               strata=strata).interval()
        covered += bool(low[0] <= truth <= high[0])
    lowest, highest = _binomial_band(200, 0.9)
    assert lowest <= covered <= highest


def test_resample_totals_rejects_bad_level():
    with pytest.raises(ValueError, match="level"):
        statistics.resample_totals(np.ones(5), num_resamples=10, level=1.5)


# ----------------------------------------------------------------------------
# Paired tests.


def _exact_mcnemar(b, c):
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 0), (3, 3), (10, 2), (2, 10), (21, 42), (120, 150),
                                  (0, 40), (700, 641)])
def test_sign_test_matches_binomtest(b, c):
    p = float(statistics.sign_test(b, c))
    if b + c:
        assert p == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)
    assert p == pytest.approx(_exact_mcnemar(b, c), rel=1e-9, abs=1e-300)


def test_discordant_counts_from_tables():
    # Hand-made 2x2 table: both recall 5, only A 3, only B 2, neither 4.
    a = np.array([1] * 5 + [1] * 3 + [0] * 2 + [0] * 4)
    b = np.array([1] * 5 + [0] * 3 + [1] * 2 + [0] * 4)
    wins, losses = statistics.discordant_counts(a, b)
    assert (wins[0], losses[0]) == (3, 2)


def test_holm_adjust_hand_computed():
    # Sorted p: 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04).
    np.testing.assert_allclose(statistics.holm_adjust([0.04, 0.01, 0.02]), [0.04, 0.03, 0.04])
    np.testing.assert_allclose(statistics.holm_adjust([0.5, 0.6]), [1.0, 1.0])


# ----------------------------------------------------------------------------
# A whole search.


@pytest.fixture(scope="module")
def small_search():
    features = synthetic.make_features(num_queries=300, num_members=4, dim=32, noise=1.0, seed=1)
    result = retrieval.search(similarity.from_features(features), ks=(1, 5), progress=False)
    return result, analysis.analyse(result, top=5)


def test_search_statistics_annotates_records(small_search):
    result, analyses = small_search
    stats = search_statistics.compute(result, num_resamples=200, level=0.9, cv_folds=3, seed=0)
    out = search_statistics.annotate(result, analyses, stats)
    assert "interval" not in analyses["modes"]["raw"]["best"]
    for mode, mode_out in out["modes"].items():
        for record in mode_out["singles"] + mode_out["top_subsets"] + mode_out["best_per_size"]:
            low, high = record["interval"]["recall_at_1"]
            assert low <= record["recall_at_1"] <= high
        best_bits = result.modes[mode].ranks[result.row_of(mode_out["best"]["mask"])] < 1
        for record in mode_out["top_subsets"][1:]:
            bits = result.modes[mode].ranks[result.row_of(record["mask"])] < 1
            test = record["versus_best"]
            assert test["only_this"] == int((bits & ~best_bits).sum())
            assert test["only_best"] == int((best_bits & ~bits).sum())
            assert test["difference"] == record["recall_at_1"] - mode_out["best"]["recall_at_1"]
        cv = mode_out["cross_validation"]
        assert sum(f["recall_at_1"] for f in cv["overall"]["folds"]) == cv["overall"]["cross_validated"]["recall_at_1"]
        assert cv["overall"]["in_sample_best"]["mask"] == mode_out["best"]["mask"]
        assert sum(e["folds"] for e in cv["overall"]["times_chosen"]) == 3


def test_held_out_ranks_use_fold_choice(small_search):
    result, _ = small_search
    stats = search_statistics.compute(result, num_resamples=0, cv_folds=4, seed=2)
    ranks = stats.held_out_ranks(result, "raw")
    cv = stats.cross_validation["raw"]
    for fold in range(4):
        held = stats.folds == fold
        row = cv.chosen[cv.groups.index("overall"), fold]
        np.testing.assert_array_equal(ranks[held], result.modes["raw"].ranks[row, held])


def test_subset_search_cli_writes_statistics(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from engine import store

    features = synthetic.make_features(num_queries=120, num_members=3, dim=16, noise=1.0, seed=4)
    for name, left, right in zip(features.names, features.left, features.right):
        store.write_array(tmp_path / "features" / name / "left.npy", left)
        store.write_array(tmp_path / "features" / name / "right.npy", right)
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.subset_search", f"--features_dir={tmp_path / 'features'}",
               f"--out_dir={out_dir}", "--bootstrap=100", "--confidence=0.9", "--cv_folds=3", "--fit_weights",
               "--fit_steps=20", "--figures=false", "--top=3", "--seed=1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]

    summary = json.loads((out_dir / "summary.json").read_text())
    settings = summary["analyses"]["statistics"]
    assert settings["bootstrap"]["num_resamples"] == 100
    assert settings["cross_validation"]["folds"] == 3
    assert "interval" in summary["analyses"]["modes"]["raw"]["best"]
    assert len(summary["analyses"]["fitted_weights"]["standardized_weights_per_fold"]) == 3
    report_text = (out_dir / "report.md").read_text()
    assert "### Cross-validated selection" in report_text
    assert "## Fitted weights (cross-validated)" in report_text


def test_cross_validate_items_stratified_scores():
    rng = np.random.default_rng(5)
    strata = np.repeat([0, 1], [60, 40])
    scores = np.where(rng.random((6, 100)) < 0.6, 0.75, 0.25)
    folds, cv = statistics.cross_validate_items(scores, _masks(6), {"overall": np.arange(6)}, num_folds=4, seed=0,
                                                strata=strata)
    chosen, held = statistics.cross_validate_reference(scores[..., None], folds, 4, _masks(6), np.arange(6))
    np.testing.assert_array_equal(cv.chosen[0], chosen)
    np.testing.assert_allclose(cv.held_out[0], held)
    np.testing.assert_array_equal(np.bincount(folds[strata == 1], minlength=4), [10, 10, 10, 10])


def test_cross_validation_ties_fall_to_smaller_subset():
    # Rows 0 (mask 3, two members) and 1 (mask 4, one member) score the same
    # fractional values on every item, so every fold must pick the smaller subset.
    rng = np.random.default_rng(8)
    shared = rng.choice([0.1, 0.3, 0.7, 0.9], size=97)
    values = np.stack([shared, shared, shared * 0.5])
    folds, cv = statistics.cross_validate_items(values, np.array([3, 4, 5]), {"overall": np.arange(3)},
                                                num_folds=4, seed=1)
    np.testing.assert_array_equal(cv.chosen[0], [1, 1, 1, 1])
    assert cv.in_sample[0] == 1


def test_statistics_with_reduced_ranks():
    # A run that keeps per-query ranks for only some subsets still gets
    # intervals for every reported subset; cross-validation is skipped with a reason.
    features = synthetic.make_features(num_queries=90, num_gallery=100, num_members=5, dim=12, seed=41)
    result = retrieval.search(similarity.from_features(features), candidates_per_member=3, progress=False,
                              keep_all_ranks=False, rank_subsets=4)
    stats = search_statistics.compute(result, num_resamples=50, cv_folds=3, seed=0)
    assert stats.cross_validation == {}
    assert "cross-validation skipped" in stats.skipped
    annotated = search_statistics.annotate(result, analysis.analyse(result, top=4), stats)
    for mode_out in annotated["modes"].values():
        for record in mode_out["best_per_size"] + mode_out["top_subsets"]:
            assert "interval" in record
    assert annotated["statistics"]["skipped"] == stats.skipped
