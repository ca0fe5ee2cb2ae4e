"""Tests for engine.scores: 2AFC per triplet and per category, JND average precision."""

import numpy as np
import pytest

from engine import scores


def test_two_afc_hand_computed():
    # d0 < d1 earns 1 - h, d1 < d0 earns h, a tie earns 0.5.
    d0 = np.array([0.1, 0.5, 0.3, 0.2])
    d1 = np.array([0.2, 0.4, 0.3, 0.2])
    judge = np.array([0.2, 0.8, 0.6, 0.0])
    np.testing.assert_allclose(scores.two_afc_scores(d0, d1, judge), [0.8, 0.8, 0.5, 0.5])


@pytest.mark.parametrize("num_triplets", [1, 2, 97])
def test_two_afc_matches_loop_reference(num_triplets):
    rng = np.random.default_rng(num_triplets)
    d0 = rng.integers(0, 4, num_triplets).astype(np.float32)  # small integers force ties
    d1 = rng.integers(0, 4, num_triplets).astype(np.float32)
    judge = rng.integers(0, 6, num_triplets) / 5.0
    np.testing.assert_array_equal(scores.two_afc_scores(d0, d1, judge),
                                  scores.two_afc_scores_reference(d0, d1, judge))


def test_two_afc_by_category_averages():
    d0 = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    d1 = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    judge = np.array([0.0, 0.2, 0.4, 0.6, 1.0])
    # Per triplet: 1.0, 0.8, 0.6 (category a), 0.6, 1.0 (category b).
    result = scores.two_afc_by_category(d0, d1, judge, np.array(["a", "a", "a", "b", "b"]), ["a", "b"])
    assert result.score("a") == pytest.approx(80.0)
    assert result.score("b") == pytest.approx(80.0)
    assert result.counts == (3, 2)
    assert result.mean_of_categories == pytest.approx(80.0)
    assert result.pooled == pytest.approx(100 * 4.0 / 5.0)
    np.testing.assert_allclose(result.per_item, [1.0, 0.8, 0.6, 0.6, 1.0])


def test_two_afc_by_category_mean_differs_from_pooled():
    d0 = np.zeros(4)
    d1 = np.ones(4)
    judge = np.array([0.0, 1.0, 1.0, 1.0])  # category a: 100, category b: 0
    result = scores.two_afc_by_category(d0, d1, judge, np.array([0, 1, 1, 1]), ["a", "b"])
    assert result.mean_of_categories == pytest.approx(50.0)
    assert result.pooled == pytest.approx(25.0)
    assert result.to_dict()["categories"]["b"] == {"score": 0.0, "count": 3}


@pytest.mark.parametrize("bad, message", [
    (dict(judge=np.array([0.5, 1.5])), "fraction"),
    (dict(d1=np.array([0.1, np.nan])), "non-finite"),
    (dict(category=np.array([0, 2])), "category codes"),
    (dict(category=np.array(["a", "z"])), "unknown categories"),
    (dict(names=["a", "b", "c"]), "no triplets"),
])
def test_two_afc_by_category_rejects_bad_input(bad, message):
    args = dict(d0=np.array([0.1, 0.2]), d1=np.array([0.2, 0.1]), judge=np.array([0.5, 0.5]),
                category=np.array([0, 1]), names=["a", "b"])
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        scores.two_afc_by_category(**args)


def _lpips_package_ap(distance, same):
    """The `lpips` 0.1.4 JND procedure (score_jnd_dataset) around its own voc_ap."""
    lpips = pytest.importorskip("lpips")
    order = np.argsort(distance)
    tp = np.cumsum(same[order])
    fp = np.cumsum(1 - same[order])
    fn = np.sum(same[order]) - tp
    return lpips.voc_ap(tp / (tp + fn), tp / (tp + fp))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jnd_matches_lpips_package_without_ties(seed):
    rng = np.random.default_rng(seed)
    distance = rng.random(200)
    same = rng.integers(0, 4, 200) / 3.0
    same[0] = 1.0
    expected = _lpips_package_ap(distance, same)
    assert scores.jnd_average_precision(distance, same) == pytest.approx(expected, abs=1e-12)
    assert scores.jnd_average_precision_reference(distance, same) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_jnd_ties_match_reference_and_ignore_order(seed):
    rng = np.random.default_rng(seed)
    distance = rng.integers(0, 5, 60).astype(np.float64)
    same = rng.integers(0, 4, 60) / 3.0
    same[0] = 1.0
    value = scores.jnd_average_precision(distance, same)
    assert value == pytest.approx(scores.jnd_average_precision_reference(distance, same), abs=1e-12)
    permutation = rng.permutation(60)
    assert scores.jnd_average_precision(distance[permutation], same[permutation]) == pytest.approx(value, abs=1e-12)


def test_jnd_hand_computed():
    # Ranked by distance: same = 1, 0, 1. Precision at the recall steps: 1 and 2/3.
    # AP = 0.5 * 1 + 0.5 * 2/3.
    value = scores.jnd_average_precision([0.1, 0.2, 0.3], [1.0, 0.0, 1.0])
    assert value == pytest.approx(0.5 + 1.0 / 3.0)
    # A perfect ranking of hard labels has AP 1; a constant distance, the base rate.
    assert scores.jnd_average_precision([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert scores.jnd_average_precision([0.5] * 4, [1, 1, 0, 0]) == pytest.approx(0.5)


def test_jnd_rejects_no_positive_pairs():
    with pytest.raises(ValueError, match="same > 0"):
        scores.jnd_average_precision([0.1, 0.2], [0.0, 0.0])


def test_jnd_by_category():
    distance = np.array([0.1, 0.2, 0.3, 0.1, 0.2])
    same = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    result = scores.jnd_by_category(distance, same, np.array([0, 0, 0, 1, 1]), ["traditional", "cnn"])
    assert result.score("traditional") == pytest.approx(100 * (0.5 + 1.0 / 3.0))
    assert result.score("cnn") == pytest.approx(50.0)
    assert result.pooled is None


def test_format_scores_table():
    result = scores.two_afc_by_category([0.0, 1.0], [1.0, 0.0], [0.2, 0.6], [0, 1], ["cnn", "color"])
    table = scores.format_scores_table({"l2-lab": result})
    assert table.splitlines()[0] == "| distance | cnn | color | mean of categories | pooled over triplets |"
    assert table.splitlines()[2] == "| l2-lab | 80.00 | 60.00 | 70.00 | 70.00 |"


def test_bootstrap_intervals_cover_estimate():
    rng = np.random.default_rng(30)
    category = np.arange(600) % 3
    per_item = np.stack([rng.integers(0, 6, 600) / 5.0, rng.random(600)])
    result = scores.bootstrap_two_afc(per_item, category, ["a", "b", "c"], num_resamples=400, seed=1)
    assert result.estimate.shape == (2, 5)
    assert np.all(result.low <= result.estimate + 1e-9)
    assert np.all(result.estimate <= result.high + 1e-9)
    # Per category the estimate is the plain mean x100; the last column is the pooled mean.
    assert result.estimate[0, 0] == pytest.approx(100 * per_item[0, category == 0].mean())
    assert result.estimate[1, 4] == pytest.approx(100 * per_item[1].mean())
    # The standard error of a mean of 200 uniform values is about 2.0 (x100); the 95% width is near 8.
    width = result.high[1, 1] - result.low[1, 1]
    assert 5.0 < width < 11.0
    again = scores.bootstrap_two_afc(per_item, category, ["a", "b", "c"], num_resamples=400, seed=1)
    np.testing.assert_array_equal(again.low, result.low)


def test_bootstrap_constant_scores_have_zero_width():
    result = scores.bootstrap_two_afc(np.full(50, 0.8), np.zeros(50, int), ["cnn"], num_resamples=50)
    assert result.low[0, 0] == pytest.approx(80.0)
    assert result.high[0, 0] == pytest.approx(80.0)
    assert set(result.to_dict(["l2"])["rows"]["l2"]) == {"cnn", "mean_of_categories", "pooled_over_triplets"}
