"""The subset search engine against the float64 brute-force reference.

Expected values come from `engine.reference`, which materialises every
similarity matrix in float64 and scores one subset at a time as the
semantics are written. The engine must agree on every (subset, query) pair
except those it flags as near-ties.
"""

import numpy as np
import pytest

from engine import reference, retrieval, similarity, store, subsets, synthetic

KS = (1, 5, 10)


def _check_against_reference(features, ks=KS, candidates_per_member=None, weights=None):
    modes = ("raw", "standardized") + tuple(weights or {})
    result = retrieval.search(similarity.from_features(features), ks=ks, modes=modes, weights=weights,
                              candidates_per_member=candidates_per_member, progress=False)
    expected = reference.reference_search(
        [np.asarray(a) for a in features.left], [np.asarray(a) for a in features.right], result.masks, result.ks,
        {"raw": None, "standardized": None, **(weights or {})})
    _assert_matches_reference(result, expected)
    return result


def _assert_matches_reference(result, expected):
    """Check the engine's contract against reference ranks, mode by mode.

    Off flagged near-ties, whether rank < K must be exact for every requested
    K and for K = 1. When every K up to K_max is requested, that makes the
    capped ranks exact too.
    """
    k_max = result.ks[-1]
    decision_ks = sorted(set(result.ks) | {1})
    for mode, mode_result in result.modes.items():
        expected_recall, expected_ranks = expected[mode]
        capped = np.minimum(expected_ranks, k_max)
        flagged = np.zeros_like(capped, dtype=bool)
        pairs = mode_result.near_tie_pairs
        flagged[pairs[:, 0], pairs[:, 1]] = True
        ranks = mode_result.ranks.astype(np.int64)
        for k in decision_ks:
            mismatched = ((ranks < k) != (capped < k)) & ~flagged
            assert not mismatched.any(), (
                f"mode {mode}, K = {k}: {mismatched.sum()} unflagged decision mismatches, first at "
                f"{np.argwhere(mismatched)[0]}")
        if result.ks == tuple(range(1, k_max + 1)):
            mismatched = (ranks != capped) & ~flagged
            assert not mismatched.any(), f"mode {mode}: {mismatched.sum()} unflagged capped-rank mismatches"
        unflagged_recall = np.stack([((ranks < k) & ~flagged).sum(1) for k in result.ks], 1)
        expected_unflagged = np.stack([((capped < k) & ~flagged).sum(1) for k in result.ks], 1)
        np.testing.assert_array_equal(unflagged_recall, expected_unflagged)
        assert mode_result.near_ties.sum() == pairs.shape[0]
        if pairs.shape[0] == 0:
            np.testing.assert_array_equal(mode_result.recall, expected_recall)


@pytest.mark.parametrize(
    "num_queries, num_gallery, num_members, dim, dtype, per_member, seed",
    [
        (1, 1, 1, 4, np.float32, None, 0),
        (1, 7, 3, 5, np.float32, None, 1),
        (2, 2, 2, 3, np.float32, None, 2),
        (37, 37, 1, 8, np.float32, None, 3),
        (60, 90, 4, 16, np.float16, None, 4),
        (120, 150, 5, 12, np.float32, 3, 5),
        (200, 260, 6, 24, np.float32, 4, 6),
        (150, 150, 6, 8, np.float16, 2, 7),
        (90, 300, 3, 32, np.float32, 1, 8),
    ],
)
def test_search_matches_reference(num_queries, num_gallery, num_members, dim, dtype, per_member, seed):
    features = synthetic.make_features(num_queries=num_queries, num_gallery=num_gallery, num_members=num_members,
                                       dim=dim, dtype=dtype, noise=1.0, seed=seed)
    ks = tuple(k for k in KS if k <= num_gallery)
    _check_against_reference(features, ks=ks, candidates_per_member=per_member)


def test_search_exercises_bound_and_fallback():
    # Small L leaves many pairs to the whole-gallery recomputation; large L
    # decides them from candidates. Both must give the same ranks.
    features = synthetic.make_features(num_queries=150, num_gallery=180, num_members=5, dim=16, noise=0.6, seed=11)
    small = _check_against_reference(features, candidates_per_member=1)
    large = _check_against_reference(features, candidates_per_member=30)
    assert small.modes["raw"].undecided_pairs > 0
    for mode in ("raw", "standardized"):
        np.testing.assert_array_equal(small.modes[mode].ranks, large.modes[mode].ranks)


def test_search_custom_weights_match_reference():
    features = synthetic.make_features(num_queries=80, num_gallery=100, num_members=4, dim=16, seed=12)
    weights = {"mixed": np.array([0.5, 2.0, 0.0, 1.25])}
    _check_against_reference(features, weights=weights, candidates_per_member=3)


def test_tiny_custom_weight_matches_reference():
    # Pass 1 puts first the candidates within a margin sized for the built-in
    # modes. With one weight 10^6 times smaller than the rest, candidates
    # outside that group can still count, and the kernel must reach them.
    features = synthetic.make_features(num_queries=90, num_gallery=110, num_members=3, dim=16, noise=1.0, seed=13)
    weights = {"skewed": np.array([1.0, 1e-6, 1.0])}
    _check_against_reference(features, weights=weights, candidates_per_member=4)


@pytest.mark.parametrize("ks", [KS, tuple(range(1, 11))])
def test_rounded_exact_tie_flagged_or_exact(ks):
    # Fixed point rounds each member on its own, so an exact tie of the sums
    # can come out one unit below the match. Query 0 under subset {0, 1}: the
    # match scores (0, 2c), six items (2c, 2c) and one item (c, c), an exact
    # tie that counts against it (true rank 7). c is chosen so that
    # 2 rint(s c) - rint(2 s c) = -1 for the fixed-point scale s.
    def matrices(c):
        first, second = np.zeros((1, 10), np.float32), np.zeros((1, 10), np.float32)
        second[0, 0] = 2 * c
        first[0, 1:7] = second[0, 1:7] = 2 * c
        first[0, 7] = second[0, 7] = c
        return [first, second]

    for c in np.linspace(0.5, 1.0, 2001, dtype=np.float32):
        source = similarity.from_matrices(["a", "b"], matrices(c))
        scale = retrieval.FixedPoint.for_mode(np.ones(2), source, weight_error=0.0).scale
        if 0.3 < (scale * float(c)) % 1 < 0.45:
            break
    result = retrieval.search(source, ks=ks, modes=("raw",), progress=False)
    ranks = reference.subset_ranks([m.astype(np.float64) for m in matrices(c)], result.masks)
    recall = np.stack([(ranks < k).sum(axis=1) for k in result.ks], axis=1)
    assert ranks[result.row_of(3), 0] == 7
    _assert_matches_reference(result, {"raw": (recall, ranks)})


def test_duplicated_gallery_items_tie_against_query():
    # Right row N duplicates right row 0 exactly: query 0 ties with it in every
    # representation, so its rank is at least 1 (ties count against the query).
    rng = np.random.default_rng(13)
    left = [rng.standard_normal((20, 6)).astype(np.float32) for _ in range(3)]
    right = []
    for a in left:
        noisy = a + 0.05 * rng.standard_normal(a.shape).astype(np.float32)
        right.append(np.concatenate([noisy, noisy[:1]], axis=0))
    features = store.features_from_arrays(["a", "b", "c"], left, right)
    result = _check_against_reference(features, ks=(1, 2))
    for mode in ("raw", "standardized"):
        assert (result.modes[mode].ranks[:, 0] >= 1).all()


def test_duplicated_queries_and_representations():
    # Two identical representations: any subset containing both ranks like
    # either one alone, in raw and standardised mode.
    features = synthetic.make_features(num_queries=50, num_gallery=60, num_members=3, dim=8, seed=14)
    left = list(features.left) + [features.left[0]]
    right = list(features.right) + [features.right[0]]
    duplicated = store.features_from_arrays(["a", "b", "c", "a_copy"], left, right)
    result = _check_against_reference(duplicated, candidates_per_member=2)
    for mode in ("raw", "standardized"):
        ranks = result.modes[mode].ranks
        np.testing.assert_array_equal(ranks[result.row_of(0b1001)], ranks[result.row_of(0b0001)])


def test_constant_features_recall_nothing():
    # Every item scores the same, so every query ties with all G - 1 others.
    left = [np.ones((10, 4), np.float32), np.full((10, 3), 2.0, np.float32)]
    right = [np.ones((12, 4), np.float32), np.full((12, 3), 5.0, np.float32)]
    features = store.features_from_arrays(["x", "y"], left, right)
    result = retrieval.search(similarity.from_features(features), ks=(1, 5), modes=("raw",), progress=False)
    np.testing.assert_array_equal(result.modes["raw"].recall, np.zeros((3, 2)))


def test_standardized_equals_raw_for_equal_scales():
    # Representations whose similarity matrices have equal standard deviations
    # get equal weights, so standardised ranks equal raw ranks exactly.
    features = synthetic.make_features(num_queries=60, num_gallery=60, num_members=1, dim=16, seed=15)
    copies = store.features_from_arrays(["a", "b", "c"], [features.left[0]] * 3, [features.right[0]] * 3)
    result = retrieval.search(similarity.from_features(copies), progress=False)
    np.testing.assert_array_equal(result.modes["raw"].ranks, result.modes["standardized"].ranks)


def test_weights_scale_invariance():
    features = synthetic.make_features(num_queries=70, num_gallery=80, num_members=3, dim=12, seed=16)
    source = similarity.from_features(features)
    base = np.array([1.0, 0.3, 2.0])
    result = retrieval.search(source, modes=("a", "b", "c"), weights={"a": base, "b": 7.5 * base, "c": 1e-9 * base},
                              candidates_per_member=2, progress=False)
    for mode in ("b", "c"):
        np.testing.assert_array_equal(result.modes["a"].ranks, result.modes[mode].ranks)
        np.testing.assert_array_equal(result.modes["a"].near_tie_pairs, result.modes[mode].near_tie_pairs)


def test_standardization_moments_match_float64():
    features = synthetic.make_features(num_queries=90, num_gallery=130, num_members=3, dim=20, seed=17)
    result = retrieval.search(similarity.from_features(features), ks=(1,), progress=False)
    matrices = reference.cosine_matrices(features.left, features.right)
    np.testing.assert_allclose(result.std, reference.population_std(matrices), rtol=1e-5)
    np.testing.assert_allclose(result.mean, [m.mean() for m in matrices], rtol=1e-5, atol=1e-7)


def test_precomputed_matrices_match_reference():
    rng = np.random.default_rng(18)
    matrices = [rng.standard_normal((40, 55)) * s for s in (1.0, 3.0, 0.2)]
    source = similarity.from_matrices(["p", "q", "r"], [m.astype(np.float32) for m in matrices])
    result = retrieval.search(source, ks=(1, 3), candidates_per_member=2, progress=False)
    ranks = reference.subset_ranks(matrices, result.masks)
    pairs = result.modes["raw"].near_tie_pairs
    flagged = np.zeros(ranks.shape, bool)
    flagged[pairs[:, 0], pairs[:, 1]] = True
    capped = np.minimum(ranks, 3)
    assert ((result.modes["raw"].ranks == capped) | flagged).all()


def test_max_subset_size_and_explicit_masks():
    features = synthetic.make_features(num_queries=30, num_gallery=30, num_members=4, dim=8, seed=19)
    source = similarity.from_features(features)
    limited = retrieval.search(source, max_subset_size=2, progress=False)
    assert subsets.popcount(limited.masks).max() == 2
    assert limited.masks.size == 4 + 6
    chosen = retrieval.search(source, masks=np.array([0b1011]), progress=False)
    # Singles are always searched alongside an explicit list.
    np.testing.assert_array_equal(chosen.masks, [1, 2, 4, 8, 11])
    full = retrieval.search(source, progress=False)
    np.testing.assert_array_equal(chosen.modes["raw"].recall[-1], full.modes["raw"].recall[full.row_of(11)])


@pytest.mark.parametrize("num_members, num_candidates, block", [(1, 1, 1), (2, 5, 3), (3, 17, 2), (5, 9, 4)])
def test_count_block_matches_bruteforce(num_members, num_candidates, block):
    rng = np.random.default_rng(20 + num_members)
    # Small integers make exact ties (total == 0) and near-ties common.
    differences = rng.integers(-6, 7, size=(block, num_candidates, num_members)).astype(np.int32)
    differences[:, 0] = 0
    upper = rng.integers(-8, 8, size=(block, num_members)).astype(np.int32)
    tolerance = rng.integers(0, 3, size=num_members).astype(np.int32)
    ks = (1, 3)
    got = retrieval.count_block(differences, upper, tolerance, low_members=num_members // 2, ks=ks)
    expected = retrieval.count_block_reference(differences, upper, tolerance, ks)
    for got_part, expected_part, name in zip(got, expected, ("rank", "near_tie", "undecided")):
        np.testing.assert_array_equal(np.asarray(got_part)[:, 1:], expected_part[:, 1:], err_msg=name)


def test_validate_ks_rejects_bad_values():
    with pytest.raises(ValueError, match="larger than the gallery"):
        retrieval.validate_ks([1, 50], num_gallery=20)
    with pytest.raises(ValueError, match=">= 1"):
        retrieval.validate_ks([0], num_gallery=20)
    assert retrieval.validate_ks([10, 1, 5, 5], num_gallery=20) == (1, 5, 10)


def test_unknown_mode_and_bad_weights_rejected():
    features = synthetic.make_features(num_queries=10, num_members=2, dim=4, seed=21)
    source = similarity.from_features(features)
    with pytest.raises(ValueError, match="unknown mode 'zscore'"):
        retrieval.search(source, modes=("zscore",), progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        retrieval.search(source, modes=("w",), weights={"w": [1.0, -1.0]}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        retrieval.search(source, modes=("w",), weights={"w": [1.0]}, progress=False)


def test_memory_budget_too_small_is_rejected():
    features = synthetic.make_features(num_queries=100, num_members=3, dim=8, seed=22)
    with pytest.raises(MemoryError, match="--memory_budget_gb"):
        retrieval.search(similarity.from_features(features), memory_budget_gb=1e-6, progress=False)


def test_undecided_pairs_kernel_and_direct_paths_agree(monkeypatch):
    # Few undecided pairs are counted in numpy, many with the kernel; both
    # must give identical ranks and near-ties.
    features = synthetic.make_features(num_queries=120, num_gallery=150, num_members=5, dim=16, noise=0.6, seed=23)
    source = similarity.from_features(features)
    direct = retrieval.search(source, candidates_per_member=1, progress=False)
    assert direct.modes["raw"].undecided_pairs > 0
    monkeypatch.setattr(retrieval, "_DIRECT_CELLS", 0)
    kernel = retrieval.search(source, candidates_per_member=1, progress=False)
    for mode in ("raw", "standardized"):
        np.testing.assert_array_equal(direct.modes[mode].ranks, kernel.modes[mode].ranks)
        np.testing.assert_array_equal(direct.modes[mode].near_tie_pairs, kernel.modes[mode].near_tie_pairs)


def test_k1_near_ties_flagged_unrequested():
    # The exclusive-retrieval and oracle analyses decide at K = 1, so its
    # near-ties are flagged even when K = 1 is not requested. Scaled copies
    # of the first 20 matches (same cosine up to float32 rounding) make them.
    features = synthetic.make_features(num_queries=60, num_gallery=80, num_members=3, dim=8, noise=0.3, seed=14)
    right = [np.array(a, copy=True) for a in features.right]
    for a in right:
        a[60:80] = a[:20] * np.float32(1.0000001)
    features = store.features_from_arrays(features.names, [np.asarray(a) for a in features.left], right)
    result = _check_against_reference(features, ks=(5, 10))
    assert result.modes["raw"].near_ties.sum() > 0


@pytest.mark.parametrize("factor", [1e20, 2.0 ** -120, 1e-9])
def test_scaled_matrices_search_alike(factor):
    # Squared deviations of values near 1e20 overflow float32, and deviations
    # of values near 2^-120 fall below its normal range, so the moments are
    # scaled by a power of two first. A common factor changes no ranking, and
    # the fixed-point scale follows the values, so every result must match
    # that of the unscaled matrices.
    rng = np.random.default_rng(15)
    small = [(1.0 + rng.standard_normal((30, 40)) / 64).astype(np.float32) for _ in range(3)]
    scaled = [m * np.float32(factor) for m in small]
    small_result = retrieval.search(similarity.from_matrices(["a", "b", "c"], small), progress=False)
    scaled_result = retrieval.search(similarity.from_matrices(["a", "b", "c"], scaled), progress=False)
    np.testing.assert_allclose(scaled_result.std, factor * small_result.std, rtol=1e-5)
    for mode in ("raw", "standardized"):
        np.testing.assert_array_equal(scaled_result.modes[mode].recall, small_result.modes[mode].recall)
        np.testing.assert_array_equal(scaled_result.modes[mode].near_ties, small_result.modes[mode].near_ties)


def test_constant_matrix_gets_zero_weight():
    # float32 rounding of the mean leaves a spread of about 1e-8 for a
    # constant matrix, which would become a weight of about 1e8.
    rng = np.random.default_rng(16)
    varying = rng.standard_normal((4, 80)).astype(np.float32)
    constant = np.full((4, 80), 0.1, np.float32)
    result = retrieval.search(similarity.from_matrices(["varying", "constant"], [varying, constant]),
                              progress=False)
    assert result.std[1] == 0.0
    np.testing.assert_array_equal(result.modes["standardized"].weights, [1.0 / result.std[0], 0.0])
    # A subset of zero-weight members scores every item alike: every item ties with the match.
    constant_only = result.modes["standardized"].ranks_of(0b10)
    np.testing.assert_array_equal(constant_only, np.full(4, result.ks[-1]))
    assert result.modes["standardized"].near_ties[result.row_of(0b10)] == 0


def test_subnormal_matrix_rejected():
    matrix = np.zeros((3, 4))
    matrix[1, 2] = 1e-40
    with pytest.raises(ValueError, match="below float32's normal range.*Multiply it by a positive constant"):
        similarity.from_matrices(["tiny"], [matrix])


def test_oversized_matrix_rejected():
    matrix = np.zeros((3, 4))
    matrix[1, 2] = 1e38
    with pytest.raises(ValueError, match="too large for float32 sums.*Divide it by a positive constant"):
        similarity.from_matrices(["big"], [matrix])
