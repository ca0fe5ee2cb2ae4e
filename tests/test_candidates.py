"""Pass 1 of the subset search (candidate selection) against brute force.

Expected values come from `retrieval.candidate_block_reference` and plain
numpy (np.cumsum, sorting): the candidate sets, their slot order (leading
candidates first), the match's own scores and the bound must match on
random rows, on duplicated gallery items (exact ties) and on constant rows.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from engine import retrieval


def _run_block(phi, rows, margin, layout):
    out = retrieval._candidate_block(jnp.asarray(phi), jnp.asarray(rows, dtype=jnp.int32),
                                     jnp.asarray(margin, dtype=jnp.float32), jnp.ones(phi.shape[0], jnp.float32),
                                     **layout)
    return [np.asarray(x) for x in out]


def _phi(num_members, block, gallery, seed, *, duplicates=False, constant_row=False):
    rng = np.random.default_rng(seed)
    # Values on a grid of 1/64 make exact ties between items frequent.
    phi = (rng.integers(-64, 65, size=(num_members, block, gallery)) / 64.0).astype(np.float32)
    if duplicates:
        phi[:, :, 1::3] = phi[:, :, 0:1]
    if constant_row:
        phi[:, 0, :] = 0.25
    return phi


@pytest.mark.parametrize("num_members, block, gallery, per_member, seed", [
    (1, 3, 9, 2, 0),        # complete: every item is a candidate
    (3, 4, 300, 5, 1),      # two-level cumsum (G > 256), G not a multiple of 128
    (2, 5, 1000, 10, 2),
    (4, 2, 257, 1, 3),
])
@pytest.mark.parametrize("duplicates", [False, True])
def test_candidate_block_matches_bruteforce(num_members, block, gallery, per_member, seed, duplicates):
    phi = _phi(num_members, block, gallery, seed, duplicates=duplicates, constant_row=True)
    rows = np.random.default_rng(seed).choice(gallery, size=block, replace=False)
    margin = np.full(num_members, 1.0 / 128, np.float32)
    layout = retrieval.candidate_layout(num_members, gallery, per_member)
    values, valid, diagonal, threshold, overflow, leading, mean, m2 = _run_block(phi, rows, margin, layout)
    expected = retrieval.candidate_block_reference(phi, rows, threshold, margin, layout["capacity"])

    np.testing.assert_array_equal(diagonal, expected["diagonal"])
    np.testing.assert_array_equal(valid.sum(axis=1), np.minimum(expected["count"], layout["capacity"]))
    np.testing.assert_array_equal(overflow, expected["count"] > layout["capacity"])
    np.testing.assert_array_equal(leading, expected["leading"])
    for b in range(block):
        items = expected["items"][b]
        np.testing.assert_array_equal(values[b, :items.size], phi[:, b, items].T, err_msg=f"query {b}")
    if layout["complete"]:
        assert np.all(np.isneginf(threshold))
    np.testing.assert_allclose(mean, phi.mean(axis=2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m2, ((phi - phi.mean(axis=2, keepdims=True)) ** 2).sum(axis=2), rtol=1e-5, atol=1e-6)


def test_sample_threshold_keeps_rank_entries():
    rng = np.random.default_rng(5)
    sample = (rng.integers(-20, 21, size=(3, 6, 40)) / 8.0).astype(np.float32)
    sample[0, 0] = 1.5                                   # constant row
    sample[1, 2, 7] = -np.inf                             # the excluded match
    sample[2, 3, :20] = sample[2, 3, 20:]                 # every value twice
    for rank in (1, 3, 16, 39):
        threshold = np.asarray(retrieval._sample_threshold(jnp.asarray(sample), rank))
        reached = (sample >= threshold[..., None]).sum(axis=-1)
        assert np.all(reached >= rank), rank
        # Never above the rank-th largest value, and within the bisection's resolution of it.
        kth = -np.sort(-sample, axis=-1)[..., rank - 1]
        assert np.all(threshold <= kth), rank
        finite = np.where(np.isneginf(sample), np.inf, sample)
        span = sample.max(axis=-1) - finite.min(axis=-1)
        assert np.all(kth - threshold <= span * 2.0 ** -13 + 1e-6), rank


@pytest.mark.parametrize("length", [1, 200, 256, 257, 1000, 6016])
def test_row_cumsum_matches_numpy(length):
    x = np.random.default_rng(length).integers(0, 3, size=(4, length)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(retrieval._row_cumsum(jnp.asarray(x))), np.cumsum(x, axis=1))


def test_differences_match_quantize():
    rng = np.random.default_rng(6)
    values = rng.uniform(-1, 1, size=(5, 7, 3)).astype(np.float32)
    values[0, 0] = [1.0, -1.0, 0.0]                       # the extremes of a cosine
    diagonal = rng.uniform(-1, 1, size=(5, 3)).astype(np.float32)
    diagonal[1] = values[1, 2]                            # exact ties with the match
    fixed = retrieval.FixedPoint(scale=retrieval.INT32_MAX / 7.0, weights=np.array([1.0, 0.3, 2.0]),
                                 tolerance=np.array([3, 3, 3]))
    expected = fixed.quantize(values) - fixed.quantize(diagonal)[:, None, :]
    got = fixed.differences(values, diagonal)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert np.all(got[1, 2] == 0)


@pytest.mark.parametrize("last", [0, 1, 5, 16, 17])
def test_count_block_early_stop(last):
    # Candidates far below the match in every member cannot count. The kernel
    # may stop before them but must reach every other one, wherever it is.
    rng = np.random.default_rng(30 + last)
    num_members, block, num_candidates = 4, 3, 17
    differences = np.full((block, num_candidates, num_members), -1000, np.int32)
    if last:
        differences[:, :last] = rng.integers(-4, 5, size=(block, last, num_members))
        differences[0, last - 1] = 2                      # the last one outranks for every subset
    upper = np.full((block, num_members), -100, np.int32)
    tolerance = np.array([1, 0, 2, 1], np.int32)
    ks = (1, 2, 5)
    got = retrieval.count_block(differences, upper, tolerance, low_members=2, ks=ks)
    expected = retrieval.count_block_reference(differences, upper, tolerance, ks)
    for got_part, expected_part, name in zip(got, expected, ("rank", "near_tie", "undecided")):
        np.testing.assert_array_equal(np.asarray(got_part)[:, 1:], expected_part[:, 1:], err_msg=name)


def test_candidate_block_past_2_15_ties():
    # 39,998 items tie at the threshold (0) below the match, so the running
    # count of non-leading candidates passes 2^15. It must stay positive.
    gallery = 40000
    phi = np.zeros((2, 1, gallery), np.float32)
    phi[:, 0, 0] = 1.0
    phi[1, 0, 7] = 2.0                                    # outranks the match in member 1
    margin = np.full(2, 1e-6, np.float32)
    layout = retrieval.candidate_layout(2, gallery, 4)
    _, valid, _, threshold, overflow, leading, _, _ = _run_block(phi, np.array([0]), margin, layout)
    expected = retrieval.candidate_block_reference(phi, np.array([0]), threshold, margin, layout["capacity"])

    assert expected["count"][0] > 1 << 15
    np.testing.assert_array_equal(overflow, [True])
    np.testing.assert_array_equal(valid.sum(axis=1), [layout["capacity"]])
    np.testing.assert_array_equal(leading, expected["leading"])
