"""Tests for engine.metric_search: the batched subset kernel against a float64 brute force."""

import json

import numpy as np
import pytest

from engine import metric_search, scores, subsets


def _random_case(seed, num_triplets, num_metrics, num_categories=3, ties=True):
    """Random distances with planted exact ties; judge values are multiples of 0.2 or arbitrary."""
    rng = np.random.default_rng(seed)
    d0 = rng.gamma(2.0, 1.0, (num_triplets, num_metrics)) * rng.uniform(0.01, 10.0, num_metrics)
    d1 = rng.gamma(2.0, 1.0, (num_triplets, num_metrics)) * rng.uniform(0.01, 10.0, num_metrics)
    d0, d1 = d0.astype(np.float32), d1.astype(np.float32)
    if ties and num_metrics >= 3:
        d0[:, 2], d1[:, 2] = d0[:, 1], d1[:, 1]  # a duplicated metric
    if ties and num_triplets >= 4:
        d1[: num_triplets // 4] = d0[: num_triplets // 4]  # d0 == d1 in every metric
    judge = rng.integers(0, 6, num_triplets) / 5.0 if seed % 2 == 0 else rng.random(num_triplets)
    category = np.arange(num_triplets) % num_categories
    return d0, d1, judge, category, min(num_categories, num_triplets)


def _reference_sign(d0, d1, weights, mask):
    combined0 = np.zeros(d0.shape[0])
    combined1 = np.zeros(d0.shape[0])
    for k in subsets.mask_members(mask, d0.shape[1]):
        combined0 = combined0 + weights[k] * d0[:, k].astype(np.float64)
        combined1 = combined1 + weights[k] * d1[:, k].astype(np.float64)
    return np.sign(combined0 - combined1), combined0 == combined1


CASES = [  # (seed, T, M)
    (0, 1, 1),
    (1, 1, 4),
    (2, 7, 1),
    (3, 60, 3),
    (4, 97, 5),
    (5, 120, 7),
]


def _reference_ties(d0, d1, weights, masks):
    return np.array([_reference_sign(d0, d1, weights, int(mask))[1].sum() for mask in masks])


@pytest.mark.parametrize("seed, num_triplets, num_metrics", CASES)
def test_search_matches_float64_reference(seed, num_triplets, num_metrics):
    d0, d1, judge, category, num_categories = _random_case(seed, num_triplets, num_metrics)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, num_categories, chunk_size=16)
    reference = metric_search.search_metric_subsets_reference(d0, d1, judge, category, num_categories)
    for mode in metric_search.MODES:
        # Subsets whose only near-ties are exact float64 ties must agree. Judge values are
        # held to 2^-43 per triplet, so the scores x100 agree far below 1e-9.
        clean = result.near_ties[mode] == _reference_ties(d0, d1, result.weights[mode], result.masks)
        assert clean.mean() >= 0.5
        np.testing.assert_allclose(result.category_scores[mode][clean], reference[mode][clean], rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed, num_triplets, num_metrics", CASES)
def test_decisions_agree_except_flagged_near_ties(seed, num_triplets, num_metrics):
    d0, d1, judge, category, num_categories = _random_case(seed, num_triplets, num_metrics)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, num_categories, chunk_size=5)
    for mode in metric_search.MODES:
        margins = metric_search.prepare_margins(d0, d1, mode)
        for row, mask in enumerate(result.masks):
            sign, near_tie = metric_search.subset_decisions(margins, int(mask))
            expected, tie = _reference_sign(d0, d1, margins.weights, int(mask))
            assert np.all((sign == expected) | near_tie), (mode, mask)
            assert np.all(near_tie[tie]), (mode, mask)
            assert result.near_ties[mode][row] == near_tie.sum()
            assert result.ties[mode][row] == np.count_nonzero(sign == 0)


def test_near_ties_are_planted_ties_with_many_triplets():
    # With T = 120 random float distances, every near-tie is a planted exact tie
    # (duplicated metric or d0 == d1); exact cancellations need T = 1 standardised.
    d0, d1, judge, category, num_categories = _random_case(5, 120, 7)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, num_categories)
    for mode in metric_search.MODES:
        np.testing.assert_array_equal(result.near_ties[mode],
                                      _reference_ties(d0, d1, result.weights[mode], result.masks))
        np.testing.assert_array_equal(result.ties[mode], result.near_ties[mode])


def test_near_tie_below_resolution_is_flagged():
    # Triplet 0 differs by 1e-12 in metric 0; triplet 1's margin of 1e3 sets the fixed-point
    # scale, so triplet 0 rounds to a tie although float64 prefers p1.
    d0 = np.array([[1.0, 5.0], [1e3, 1.0]])
    d1 = np.array([[1.0 - 1e-12, 5.0], [0.0, 2.0]])
    judge = np.array([1.0, 0.0])
    result = metric_search.search_metric_subsets(d0, d1, judge, np.array([0, 0]), 1, modes=("raw",))
    reference = metric_search.search_metric_subsets_reference(d0, d1, judge, np.array([0, 0]), 1, modes=("raw",))
    row = list(result.masks).index(1)
    assert result.near_ties["raw"][row] == 1
    assert result.ties["raw"][row] == 1
    assert result.category_scores["raw"][row, 0] == pytest.approx(25.0)  # engine: tie 0.5, then 0.0
    assert reference["raw"][row, 0] == pytest.approx(50.0)  # float64: 1.0, then 0.0


def test_chunk_size_does_not_change_results():
    d0, d1, judge, category, num_categories = _random_case(6, 80, 6)
    results = [metric_search.search_metric_subsets(d0, d1, judge, category, num_categories, chunk_size=size)
               for size in (1, 7, 64)]
    for other in results[1:]:
        for mode in metric_search.MODES:
            np.testing.assert_array_equal(other.category_scores[mode], results[0].category_scores[mode])
            np.testing.assert_array_equal(other.near_ties[mode], results[0].near_ties[mode])


def test_overall_columns_match_two_afc_by_category():
    d0, d1, judge, category, num_categories = _random_case(8, 90, 4, ties=False)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, num_categories)
    names = ["a", "b", "c"]
    for row, mask in enumerate(result.masks):
        for mode in result.modes:
            per_triplet = metric_search.subset_triplet_scores(d0, d1, judge, int(mask), mode=mode)
            expected = scores.two_afc_by_category(*_combined(d0, d1, result.weights[mode], int(mask)), judge,
                                                  category, names)
            assert per_triplet.mean() * 100 == pytest.approx(result.pooled[mode][row], abs=1e-9)
            assert result.pooled[mode][row] == pytest.approx(expected.pooled, abs=1e-9)
            assert result.mean_of_categories[mode][row] == pytest.approx(expected.mean_of_categories, abs=1e-9)


def _combined(d0, d1, weights, mask):
    members = subsets.mask_members(mask, d0.shape[1])
    return (d0[:, members].astype(np.float64) @ weights[members], d1[:, members].astype(np.float64) @ weights[members])


def test_standardized_weights_are_inverse_population_std():
    d0, d1, *_ = _random_case(10, 50, 3, ties=False)
    weights = metric_search.metric_weights(d0, d1, "standardized")
    both = np.concatenate([d0, d1]).astype(np.float64)
    np.testing.assert_allclose(weights, 1.0 / both.std(axis=0, ddof=0))
    np.testing.assert_array_equal(metric_search.metric_weights(d0, d1, "raw"), np.ones(3))


def test_rejects_constant_metric_and_bad_input():
    d0 = np.ones((4, 2))
    d1 = np.ones((4, 2))
    d1[:, 0] = 2.0
    with pytest.raises(ValueError, match="constant"):
        metric_search.metric_weights(d0, d1, "standardized")
    with pytest.raises(ValueError, match="unknown mode"):
        metric_search.metric_weights(d0, d1, "zscore")
    with pytest.raises(ValueError, match="no triplets"):
        metric_search.search_metric_subsets(d0, d1, np.full(4, 0.5), np.zeros(4, int), 2, modes=("raw",))
    with pytest.raises(ValueError, match="finite"):
        metric_search.search_metric_subsets(d0 * np.nan, d1, np.full(4, 0.5), np.zeros(4, int), 1)


def test_best_prefers_fewer_members_then_lower_mask():
    # Metric 1 duplicates metric 0, so {0}, {1} and {0, 1} score the same.
    d0, d1, judge, category, _ = _random_case(12, 40, 2, ties=False)
    d0[:, 1], d1[:, 1] = d0[:, 0], d1[:, 0]
    result = metric_search.search_metric_subsets(d0, d1, judge, category, 3, metric_names=["x", "x2"],
                                                 category_names=["a", "b", "c"])
    best = result.best("raw", "pooled_over_triplets")
    assert best.mask == 1
    assert best.members == ("x",)
    assert result.best("raw", "a", min_size=2).mask == 3
    assert result.best("raw", "a", min_size=3) is None


def test_max_subset_size_limits_masks():
    d0, d1, judge, category, num_categories = _random_case(14, 30, 5, ties=False)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, num_categories, max_subset_size=2)
    assert result.masks.shape == (5 + 10,)
    assert result.sizes.max() == 2


def test_combination_table_and_json():
    d0, d1, judge, category, _ = _random_case(16, 60, 3, ties=False)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, 3, metric_names=["l2", "ssim", "alex"],
                                                 category_names=["cnn", "color", "deblur"])
    table = metric_search.format_combination_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("| distortion | best single | score | best raw combination |")
    assert lines[2].startswith("| cnn | ")
    assert "| mean of categories |" in table
    assert "Near-tie" in table
    summary = json.loads(json.dumps(result.to_dict(include_subsets=True)))
    assert len(summary["modes"]["raw"]["subsets"]) == 7
    single = result.best("raw", "cnn", max_size=1)
    assert summary["modes"]["raw"]["best"]["cnn"]["single"]["score"] == pytest.approx(single.score)


def _profiles(seed, num_triplets, channels):
    rng = np.random.default_rng(seed)
    shape = (num_triplets, sum(channels))
    return rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32), rng.integers(0, 6, num_triplets) / 5.0


def test_single_layer_sweep_scores_each_tap():
    channels = (2, 3, 1)
    profile0, profile1, judge = _profiles(20, 50, channels)
    category = np.arange(50) % 2
    calibrated = np.linspace(0.1, 1.0, 6)
    sweep = metric_search.single_layer_sweep(profile0, profile1, judge, category, channels, calibrated,
                                             category_names=["cnn", "color"], net="alex")
    bounds = [0, 2, 5, 6]
    for tap in range(3):
        d0 = profile0[:, bounds[tap]:bounds[tap + 1]].astype(np.float64).sum(axis=1)
        d1 = profile1[:, bounds[tap]:bounds[tap + 1]].astype(np.float64).sum(axis=1)
        expected = scores.two_afc_by_category(d0, d1, judge, category, ["cnn", "color"])
        assert sweep.taps[tap].scores == pytest.approx(expected.scores)
    expected = scores.two_afc_by_category(profile0 @ calibrated, profile1 @ calibrated, judge, category, ["cnn", "color"])
    assert sweep.calibrated.scores == pytest.approx(expected.scores)

    tap, score = sweep.best_tap("cnn")
    assert score == max(t.score("cnn") for t in sweep.taps)
    entry = sweep.to_dict()["categories"]["cnn"]
    assert entry["best_tap"] == tap
    assert entry["delta_calibrated_minus_best_tap"] == pytest.approx(sweep.calibrated.score("cnn") - score)


def test_single_layer_tables():
    channels = (2, 2)
    profile0, profile1, judge = _profiles(21, 30, channels)
    sweeps = [metric_search.single_layer_sweep(profile0, profile1, judge, np.zeros(30, int), channels, None,
                                               category_names=["cnn"], net=net) for net in ("alex", "vgg")]
    table = metric_search.format_single_layer_table(sweeps).splitlines()
    assert table[0] == "| distortion | net | best tap | score | calibrated | Δ |"
    assert table[2].startswith("| cnn | alex | ")
    assert table[3].startswith("| cnn | vgg | ")
    assert table[2].endswith("| n/a | n/a |")
    assert "all taps, uncalibrated" in metric_search.format_tap_table(sweeps[0])


def test_single_layer_sweep_rejects_bad_channels():
    profile0, profile1, judge = _profiles(22, 10, (2, 2))
    with pytest.raises(ValueError, match="sum to the profile width"):
        metric_search.single_layer_sweep(profile0, profile1, judge, np.zeros(10, int), (2, 3), None,
                                         category_names=["cnn"])


def test_score_of_reads_one_subset():
    d0, d1, judge, category, num_categories = _random_case(18, 40, 3, ties=False)
    result = metric_search.search_metric_subsets(d0, d1, judge, category, num_categories, max_subset_size=2)
    row = list(result.masks).index(5)
    assert result.score_of("raw", "c1", 5) == result.category_scores["raw"][row, 1]
    assert result.score_of("standardized", "pooled_over_triplets", 5) == result.pooled["standardized"][row]
    with pytest.raises(ValueError, match="was not searched"):
        result.score_of("raw", "c1", 7)  # three members, beyond max_subset_size
