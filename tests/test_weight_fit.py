"""Fitted representation weights (engine.weight_fit).

Expected values: the cache and the surrogate against float64 brute force
over whole similarity matrices (`engine.reference.cosine_matrices`), held-out
ranks against `engine.reference.subset_ranks`, and a planted weighting whose
optimum follows from the simulation (see `_planted_features`).
"""

import numpy as np
import pytest

from engine import reference, retrieval, similarity, statistics, store, weight_fit


def _planted_features(num_queries=400, dim=64, correlations=(0.3, 0.15, 0.0), seed=0):
    """Representation k pairs left and right through a shared latent with correlation ρ_k per entry.

    For large D the cosine of a true pair is about ρ_k and that of any other
    pair about 0, with variance about 1/D in both cases and independently
    across representations. The log-likelihood ratio of "j is the match" is
    then linear in Φ_k with coefficients proportional to ρ_k, which is what a
    softmax cross-entropy over the gallery estimates: ρ = (0.3, 0.15, 0)
    plants raw weights in the ratio 2 : 1 : 0.
    """
    rng = np.random.default_rng(seed)
    left, right = [], []
    for rho in correlations:
        latent = rng.standard_normal((num_queries, dim))
        left.append((np.sqrt(rho) * latent + np.sqrt(1 - rho) * rng.standard_normal((num_queries, dim)))
                    .astype(np.float32))
        right.append((np.sqrt(rho) * latent + np.sqrt(1 - rho) * rng.standard_normal((num_queries, dim)))
                     .astype(np.float32))
    return store.features_from_arrays([f"rep{k}" for k in range(len(correlations))], left, right)


def _std(features):
    return reference.population_std(reference.cosine_matrices(features.left, features.right))


def test_fit_recovers_planted_weighting():
    features = _planted_features()
    source = similarity.from_features(features)
    std = _std(features)
    cache = weight_fit.build_fit_cache(source, std, progress=False)
    fitted = weight_fit.raw_weights(weight_fit.fit_weights(cache, np.arange(features.num_queries)), std)
    # Planted ratio 2 : 1 : 0 (see _planted_features); the tolerance covers the
    # finite-D approximation and the sampling noise of 400 queries.
    assert 1.5 < fitted[0] / fitted[1] < 2.7
    assert fitted[2] < 0.15 * fitted[0]


def test_fit_is_deterministic():
    features = _planted_features(num_queries=150, seed=1)
    source = similarity.from_features(features)
    std = _std(features)
    options = weight_fit.FitOptions(steps=40, batch_size=32, seed=3)
    first = weight_fit.fit_weights(weight_fit.build_fit_cache(source, std, options=options, progress=False),
                                   np.arange(100), options=options, fold=1)
    second = weight_fit.fit_weights(weight_fit.build_fit_cache(source, std, options=options, progress=False),
                                    np.arange(100), options=options, fold=1)
    np.testing.assert_array_equal(first, second)


def test_cache_holds_top_items_and_margins():
    features = _planted_features(num_queries=60, dim=16, seed=2)
    source = similarity.from_features(features)
    matrices = reference.cosine_matrices(features.left, features.right)
    std = reference.population_std(matrices)
    options = weight_fit.FitOptions(hard_per_member=4, tail_samples=8)
    cache = weight_fit.build_fit_cache(source, std, options=options, progress=False)
    hard_slots = 3 * 4
    for query in (0, 17, 59):
        rows = np.stack([m[query] for m in matrices])                       # [M, G]
        others = np.delete(np.arange(60), query)
        expected = set()
        for k in range(3):
            expected |= set(others[np.argsort(-rows[k, others], kind="stable")[:4]].tolist())
        kept = np.isfinite(cache.log_weights[query, :hard_slots])
        assert kept.sum() == len(expected)
        margins = cache.margins[query][:, :hard_slots][:, kept]                 # [M, H']
        expected_margins = (rows[:, sorted(expected)] - rows[:, [query]]) / std[:, None]
        np.testing.assert_allclose(margins, expected_margins, atol=1e-4)


def test_surrogate_equals_full_softmax_when_cache_covers_gallery():
    # With hard_per_member >= G - 1 every other item is a hard negative, every
    # random draw is excluded, and the loss is the exact softmax over the gallery.
    features = _planted_features(num_queries=30, dim=16, seed=3)
    source = similarity.from_features(features)
    matrices = reference.cosine_matrices(features.left, features.right)
    std = reference.population_std(matrices)
    cache = weight_fit.build_fit_cache(source, std, options=weight_fit.FitOptions(hard_per_member=40,
                                                                                  tail_samples=5), progress=False)
    weights = np.array([1.5, 0.7, 0.2])
    scores = sum(w * m / s for w, m, s in zip(weights, matrices, std))
    margins = scores - np.diag(scores)[:, None]
    np.fill_diagonal(margins, 0.0)
    expected = np.mean(np.log(np.exp(margins).sum(axis=1)))   # the diagonal contributes exp(0) = 1
    rows = np.arange(30)
    assert weight_fit.surrogate_loss(cache, rows, weights) == pytest.approx(expected, rel=1e-5)


def test_held_out_ranks_match_reference():
    features = _planted_features(num_queries=80, dim=16, seed=4)
    source = similarity.from_features(features)
    matrices = reference.cosine_matrices(features.left, features.right)
    weights = np.array([1.0, 0.4, 0.05])
    queries = np.array([3, 70, 11, 42, 0])
    ranks = weight_fit.held_out_ranks(source, queries, {"w": weights}, ks=(1, 5))["w"][0]
    expected = reference.subset_ranks(matrices, np.array([7]), weights=weights)[0, queries]
    np.testing.assert_array_equal(ranks, np.minimum(expected, 5))


def test_select_queries_keeps_ranks_with_distractors():
    features = _planted_features(num_queries=40, dim=8, seed=5)
    left = [a[:25] for a in features.left]
    features = store.features_from_arrays(features.names, left, features.right)
    source = similarity.from_features(features)
    queries = np.array([24, 2, 9])
    full = retrieval.search(source, ks=(3,), modes=("raw",), progress=False)
    part = retrieval.search(source.select_queries(queries), ks=(3,), modes=("raw",), progress=False)
    np.testing.assert_array_equal(part.modes["raw"].ranks, full.modes["raw"].ranks[:, queries])


def test_cross_validated_weights_fit_training_folds_only():
    features = _planted_features(num_queries=120, dim=32, seed=6)
    source = similarity.from_features(features)
    std = _std(features)
    options = weight_fit.FitOptions(steps=30, batch_size=40)
    folds = statistics.assign_folds(120, 3, seed=0)
    held = weight_fit.cross_validate_weights(source, folds, std, ks=(1,), options=options,
                                             compare_standardized=True, progress=False)
    cache = weight_fit.build_fit_cache(source, std, options=options, progress=False)
    for fold in range(3):
        expected = weight_fit.fit_weights(cache, np.flatnonzero(folds != fold), options=options, fold=fold)
        np.testing.assert_allclose(held.standardized[fold], expected, rtol=1e-6)
    assert held.ranks["fitted"].shape == (120,)
    assert set(held.ranks) == {"fitted", "standardized_equal"}


def test_fit_options_reject_bad_values():
    with pytest.raises(ValueError, match="steps"):
        weight_fit.FitOptions(steps=0)
