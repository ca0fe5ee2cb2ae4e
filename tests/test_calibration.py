"""Tests for engine.calibration: non-negative, optionally sparse channel weights."""

import json

import numpy as np
import pytest

from engine import calibration, scores


def _planted_case(seed, num_triplets=2000, num_channels=30, support=(3, 7, 20), values=(1.5, 0.8, 2.5)):
    """Profiles with channel scales spread over two decades, judged by a planted sparse weighting."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, num_channels)
    profile0 = (rng.gamma(2.0, 1.0, (num_triplets, num_channels)) * scale).astype(np.float32)
    profile1 = (rng.gamma(2.0, 1.0, (num_triplets, num_channels)) * scale).astype(np.float32)
    planted = np.zeros(num_channels)
    planted[list(support)] = values
    planted /= np.sqrt(np.mean((profile0 - profile1).astype(np.float64) ** 2, axis=0))
    probability = 1.0 / (1.0 + np.exp(-(profile0 - profile1) @ planted))
    judge = rng.binomial(5, probability) / 5.0  # five people per triplet, as in BAPPS val
    return profile0, profile1, judge, planted


def test_recovers_planted_sparse_weighting():
    profile0, profile1, judge, planted = _planted_case(0)
    fit = calibration.fit_channel_weights(profile0, profile1, judge, l1=1e-3, steps=400)
    top = np.sort(np.argsort(-fit.weights)[:3])
    np.testing.assert_array_equal(top, [3, 7, 20])
    assert np.corrcoef(fit.weights, planted)[0, 1] > 0.99
    # The planted weighting's own 2AFC score bounds what a fit can reach on these triplets.
    fitted = scores.two_afc_scores(profile0 @ fit.weights, profile1 @ fit.weights, judge).mean()
    best = scores.two_afc_scores(profile0 @ planted, profile1 @ planted, judge).mean()
    assert fitted == pytest.approx(best, abs=0.01)


def test_l1_reduces_nonzeros_and_weights_stay_nonnegative():
    profile0, profile1, judge, _ = _planted_case(1)
    fits = [calibration.fit_channel_weights(profile0, profile1, judge, l1=l1, steps=300) for l1 in (0.0, 1e-3, 3e-2)]
    nonzeros = [fit.num_nonzero for fit in fits]
    assert nonzeros[0] >= nonzeros[1] >= nonzeros[2]
    assert nonzeros[2] < nonzeros[0]
    assert nonzeros[2] >= 3  # the planted support survives
    for fit in fits:
        assert fit.weights.min() >= 0.0
        assert fit.num_nonzero == np.count_nonzero(fit.weights)


def test_objective_decreases_and_fit_is_deterministic():
    profile0, profile1, judge, _ = _planted_case(2, num_triplets=500)
    first = calibration.fit_channel_weights(profile0, profile1, judge, l1=1e-3, steps=200, seed=3)
    second = calibration.fit_channel_weights(profile0, profile1, judge, l1=1e-3, steps=200, seed=3)
    np.testing.assert_array_equal(first.weights, second.weights)
    assert first.loss[-1] < first.loss[0]
    assert first.loss[-1] <= first.loss[len(first.loss) // 2] + 1e-6
    # At zero weights the cross-entropy is log 2; the fit must beat it.
    assert first.cross_entropy < np.log(2.0)


def test_anti_correlated_channel_gets_zero_weight():
    # Channel 1 points the wrong way (people prefer the larger difference), so w >= 0 forces 0.
    rng = np.random.default_rng(4)
    profile0 = rng.random((400, 2)).astype(np.float32)
    profile1 = rng.random((400, 2)).astype(np.float32)
    logits = 4.0 * (profile0[:, 0] - profile1[:, 0]) - 4.0 * (profile0[:, 1] - profile1[:, 1])
    judge = 1.0 / (1.0 + np.exp(-logits))
    fit = calibration.fit_channel_weights(profile0, profile1, judge, steps=300)
    assert fit.weights[0] > 0.0
    assert fit.weights[1] == 0.0


def test_nonzero_per_tap_and_summary():
    profile0, profile1, judge, _ = _planted_case(5, num_triplets=300)
    fit = calibration.fit_channel_weights(profile0, profile1, judge, l1=3e-2, steps=100)
    per_tap = calibration.nonzero_per_tap(fit.weights, (10, 10, 10))
    assert sum(per_tap) == fit.num_nonzero
    summary = json.loads(json.dumps(fit.to_dict(include_weights=True)))
    assert summary["num_nonzero"] == fit.num_nonzero
    assert len(summary["weights"]) == 30


def test_fit_table():
    profile0, profile1, judge, _ = _planted_case(6, num_triplets=200, num_channels=6, support=(1,), values=(2.0,))
    fit = calibration.fit_channel_weights(profile0, profile1, judge, steps=50)
    category = np.arange(200) % 2
    result = scores.two_afc_by_category(profile0 @ fit.weights, profile1 @ fit.weights, judge, category, ["cnn", "color"])
    table = calibration.format_fit_table([{"label": "fit", "fit": fit, "scores": result}], ["cnn", "color"])
    assert table.splitlines()[0] == "| weighting | non-zero weights | cnn | color | mean of categories | pooled over triplets |"
    assert table.splitlines()[2].startswith(f"| fit | {fit.num_nonzero} / 6 | ")


@pytest.mark.parametrize("kwargs, message", [
    (dict(l1=-1.0), "l1 must be >= 0"),
    (dict(steps=0), "steps >= 1"),
])
def test_rejects_bad_options(kwargs, message):
    profile0, profile1, judge, _ = _planted_case(7, num_triplets=20, num_channels=4, support=(0,), values=(1.0,))
    with pytest.raises(ValueError, match=message):
        calibration.fit_channel_weights(profile0, profile1, judge, **kwargs)
    with pytest.raises(ValueError, match="judge"):
        calibration.fit_channel_weights(profile0, profile1, judge[:5])
