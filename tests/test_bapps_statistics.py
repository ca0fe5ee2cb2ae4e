"""Held-out selection, paired tests and sharding of the 2AFC metric-combination search.

Expected values come from brute force beside each computation: per-subset
per-triplet scores from `metric_search.subset_triplet_scores` (itself checked
against the float64 reference in test_metric_search.py), choices made by
sorting those scores on the training triplets only, and discordant counts
counted triplet by triplet.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from engine import analysis, bapps_report, bapps_statistics, metric_search, statistics, subsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(seed, num_triplets=90, num_metrics=4, num_categories=3):
    """Random distances with one informative metric (bit 0); five simulated votes per triplet (a strict majority)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=num_triplets)
    d0 = rng.gamma(2.0, 1.0, (num_triplets, num_metrics))
    d1 = rng.gamma(2.0, 1.0, (num_triplets, num_metrics))
    d1[:, 0] = d0[:, 0] + truth + 0.5 * rng.normal(size=num_triplets)
    d1[:, 0] = np.abs(d1[:, 0])
    chooses_p1 = 1.0 / (1.0 + np.exp(3.0 * truth))  # p1 is closer when truth < 0
    judge = (rng.random((num_triplets, 5)) < chooses_p1[:, None]).mean(axis=1)
    category = rng.integers(0, num_categories, num_triplets)
    category[:num_categories] = np.arange(num_categories)
    return d0, d1, judge, category, num_categories


def _brute_force_cv(d0, d1, judge, category, num_categories, folds, num_folds, mode, criterion, rows_of):
    """Choose on the other folds by sorting per-triplet scores, score on the held-out fold."""
    masks = subsets.all_masks(d0.shape[1])
    per_item = np.stack([metric_search.subset_triplet_scores(d0, d1, judge, int(m), mode=mode) for m in masks])
    weighted = per_item * bapps_statistics.criterion_weights(category, num_categories, criterion)
    chosen, total = [], 0.0
    for f in range(num_folds):
        train = weighted[:, folds != f].sum(axis=1)
        rows = rows_of(masks)
        best = int(rows[analysis.subset_order(train[rows][:, None], masks[rows])[0]])
        chosen.append(int(masks[best]))
        total += weighted[best, folds == f].sum()
    return chosen, total


@pytest.mark.parametrize("mode", metric_search.MODES)
def test_cross_validated_combination_matches_brute_force(mode):
    d0, d1, judge, category, k = _case(0)
    names = [f"m{i}" for i in range(d0.shape[1])]
    out = bapps_statistics.cross_validate_subsets(d0, d1, judge, category, k, names, modes=(mode,), num_folds=4,
                                                  seed=3)
    folds = statistics.assign_folds(len(judge), 4, seed=3, strata=category)
    for criterion in bapps_statistics.CRITERIA:
        for group, rows_of in (("overall", lambda m: np.arange(m.size)),
                               ("size_2", lambda m: np.flatnonzero(subsets.popcount(m) == 2))):
            chosen, total = _brute_force_cv(d0, d1, judge, category, k, folds, 4, mode, criterion, rows_of)
            record = out["modes"][mode][criterion][group]
            assert record["cross_validated"] == pytest.approx(total, abs=1e-9)
            counts = {c["mask"]: c["folds"] for c in record["times_chosen"]}
            assert counts == {m: chosen.count(m) for m in set(chosen)}


def test_fold_totals_ignore_held_out_judgments():
    d0, d1, judge, category, k = _case(1)
    folds = statistics.assign_folds(len(judge), 5, seed=0, strata=category)
    masks, totals, counts = metric_search.fold_category_totals(d0, d1, judge, category, k, folds, 5,
                                                               mode="standardized", chunk_size=4)
    # Summed over folds: the plain search's category scores.
    search = metric_search.search_metric_subsets(d0, d1, judge, category, k, modes=("standardized",))
    np.testing.assert_allclose(100 * totals.sum(axis=1) / counts.sum(axis=0),
                               search.category_scores["standardized"], atol=1e-9)
    # Flipping every judgment of fold 2 changes only fold 2's totals, so the
    # choice made without fold 2 cannot depend on fold 2's triplets.
    flipped = np.where(folds == 2, 1.0 - judge, judge)
    _, totals_flipped, _ = metric_search.fold_category_totals(d0, d1, flipped, category, k, folds, 5,
                                                              mode="standardized")
    others = np.arange(5) != 2
    np.testing.assert_array_equal(totals_flipped[:, others], totals[:, others])
    assert not np.array_equal(totals_flipped[:, 2], totals[:, 2])


def test_cross_validated_taps_match_brute_force():
    rng = np.random.default_rng(4)
    category = np.arange(40) % 2
    per_tap = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0], size=(3, 40))
    per_tap[2] = per_tap[1]  # a tie goes to the shallower tap
    out = bapps_statistics.cross_validate_taps(per_tap, category, 2, ["a", "b", "c"], num_folds=4, seed=1)
    folds = statistics.assign_folds(40, 4, seed=1, strata=category)
    weights = bapps_statistics.criterion_weights(category, 2, "mean_of_categories")
    total = 0.0
    for f in range(4):
        best = int(np.argmax((per_tap[:, folds != f] * weights[folds != f]).sum(axis=1)))
        assert best != 2
        total += (per_tap[best, folds == f] * weights[folds == f]).sum()
    assert out["mean_of_categories"]["cross_validated"] == pytest.approx(total)


def _table(split, d0, d1, judge, category, k):
    names = [f"m{i}" for i in range(d0.shape[1])]
    return bapps_report.SplitTable(
        task="2afc", split=split, category_names=tuple(f"c{i}" for i in range(k)), category=category,
        stems=np.arange(len(judge)).astype(str), labels=judge, profiles={},
        distances={n: (d0[:, i], d1[:, i]) for i, n in enumerate(names)}), names


def test_choose_on_train_uses_only_train():
    train, names = _table("train", *_case(5))
    val, _ = _table("val", *_case(6))
    first = bapps_report.run_analyses(val, {}, search_metrics=names, selection_train=train, bootstrap_resamples=0)
    # Other val judgments change the val scores but never the choice.
    val.labels = 1.0 - val.labels
    second = bapps_report.run_analyses(val, {}, search_metrics=names, selection_train=train, bootstrap_resamples=0)
    train_search = metric_search.search_metric_subsets(
        *bapps_report._search_distances(train, names), train.labels, train.category, 3, metric_names=names)
    for mode in metric_search.MODES:
        for criterion in bapps_statistics.CRITERIA:
            for group, record in first.selection["combinations"][mode][criterion].items():
                again = second.selection["combinations"][mode][criterion][group]
                assert again["chosen"] == record["chosen"]
                mask = record["chosen"]["mask"]
                assert record["held_out"] == first.search.score_of(mode, criterion, mask)
                assert again["held_out"] == second.search.score_of(mode, criterion, mask)
                assert record["train_score"] == train_search.score_of(mode, criterion, mask)
            overall = train_search.best(mode, criterion)
            assert first.selection["combinations"][mode][criterion]["overall"]["chosen"]["mask"] == overall.mask


def test_paired_comparison_counts_majority_discordance():
    d0, d1, judge, category, k = _case(7, num_triplets=120)
    judge[:10] = 0.5
    per_item = np.stack([metric_search.subset_triplet_scores(d0, d1, judge, m, mode="raw") for m in (1, 2, 3, 4)])
    records = bapps_statistics.paired_comparison(per_item, ["a", "b", "c", "d"], judge, category, k, reference=0,
                                                 num_resamples=200, level=0.9, seed=0)
    assert records[0]["reference"] and "p_value" not in records[0]
    weights = bapps_statistics.criterion_weights(category, k, "mean_of_categories")
    masks = (1, 2, 3, 4)

    def agrees(mask, t):
        members = subsets.mask_members(mask, d0.shape[1])
        margin = d0[t, members].sum() - d1[t, members].sum()  # > 0: prefers p1
        return margin != 0 and (margin > 0) == (judge[t] > 0.5)

    p_values = []
    for row, record in enumerate(records):
        wins = losses = 0
        for t in range(len(judge)):
            if judge[t] == 0.5:
                continue
            mine, theirs = agrees(masks[row], t), agrees(masks[0], t)
            wins += mine and not theirs
            losses += theirs and not mine
        assert (record["majority_wins"], record["majority_losses"]) == (wins, losses)
        assert record["score"] == pytest.approx((per_item[row] * weights).sum())
        assert record["difference"] == pytest.approx(record["score"] - records[0]["score"])
        if row:
            lo, hi = record["difference_interval"]
            assert lo <= record["difference"] <= hi
            p_values.append(statistics.sign_test(wins, losses))
    adjusted = statistics.holm_adjust(np.array(p_values))
    for record, p, q in zip(records[1:], p_values, adjusted):
        assert record["p_value"] == pytest.approx(float(p))
        assert record["p_holm"] == pytest.approx(q)
        assert record["distinguishable"] == (q < 0.1)
    # The informative metric beats pure noise on this many triplets.
    assert any(r["distinguishable"] for r in records[1:])


_SHARDED = """
import sys, numpy as np, jax
sys.path.insert(0, {root!r})
from engine import distributed, metric_search
from tests.test_bapps_statistics import _case
assert jax.local_device_count() == 4, jax.devices()
d0, d1, judge, category, k = _case(11, num_triplets=150, num_metrics=6)
out = {{}}
for devices in (1, 4):
    topology = distributed.local(jax.local_devices()[:devices])
    result = metric_search.search_metric_subsets(d0, d1, judge, category, k, chunk_size=5, topology=topology)
    for mode in result.modes:
        out[f"{{devices}}/{{mode}}/scores"] = result.category_scores[mode]
        out[f"{{devices}}/{{mode}}/near"] = result.near_ties[mode]
        out[f"{{devices}}/{{mode}}/ties"] = result.ties[mode]
np.savez({out!r}, **out)
"""


def test_four_devices_equal_one_device_bit_for_bit(tmp_path):
    out = str(tmp_path / "sharded.npz")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    subprocess.run([sys.executable, "-c", _SHARDED.format(root=ROOT, out=out)], cwd=ROOT, env=env, check=True,
                   timeout=120)
    got = np.load(out)
    d0, d1, judge, category, k = _case(11, num_triplets=150, num_metrics=6)
    single_device = metric_search.search_metric_subsets(d0, d1, judge, category, k)
    for mode in metric_search.MODES:
        for devices in (1, 4):
            # 63 subsets in chunks of 5: 13 chunks, so 4 devices run a padded last step.
            np.testing.assert_array_equal(got[f"{devices}/{mode}/scores"], single_device.category_scores[mode])
            np.testing.assert_array_equal(got[f"{devices}/{mode}/near"], single_device.near_ties[mode])
            np.testing.assert_array_equal(got[f"{devices}/{mode}/ties"], single_device.ties[mode])
