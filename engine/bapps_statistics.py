"""Held-out selection and paired tests for the BAPPS 2AFC metric combinations and single taps.

Shapes: T triplets, M metrics, S subsets, K categories, F folds, L taps.

The best combination and the best single tap are chosen on the data that
scores them, which flatters them. This module reports what holds up:

- Held-out selection. With a train split, the choice is made on train and
  scored on the evaluated split (`select_on_train`). Otherwise the triplets
  are dealt into F folds, stratified by category, and each fold is scored by
  the subset chosen on the other folds (`cross_validate_subsets`,
  `cross_validate_taps`). Both criteria are reported: the mean of categories
  and the score pooled over triplets. Under cross-validation, the mean of
  categories weighs a triplet of category k by 1 / (K n_k), with n_k its
  count over all folds, so the held-out totals add up to the mean of
  categories over all triplets.
- Paired comparison (`paired_comparison`): each row against a reference row
  on the same triplets. The difference of the mean of categories gets a
  paired percentile bootstrap interval (triplets resampled within
  categories). 2AFC outcomes are soft (1 - h, h or 0.5), so McNemar's test
  does not apply to them. The test is instead the exact two-sided sign test
  on the triplets with a strict human majority (h != 0.5) where exactly one
  of the two rows agrees with that majority. p-values are Holm-adjusted
  within each table. A row is distinguishable from the reference when its
  adjusted p-value is below 1 - confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine import distributed, metric_search, statistics, subsets

__all__ = [
    "CRITERIA",
    "SIGN_TEST",
    "criterion_weights",
    "cross_validate_subsets",
    "cross_validate_taps",
    "format_comparison_table",
    "format_selection_table",
    "paired_comparison",
    "select_on_train",
    "selection_groups",
]

CRITERIA = ("mean_of_categories", "pooled_over_triplets")
SIGN_TEST = ("exact two-sided sign test on the triplets with a strict human majority (h != 0.5) where exactly "
             "one of the two agrees with the majority; Holm-adjusted within each table")


def criterion_weights(category: np.ndarray, num_categories: int, criterion: str) -> np.ndarray:
    """Return float64 `[T]` weights w with sum_t w_t score_t = the criterion's score x100.

    "mean_of_categories": 100 / (K n_k) for a triplet of category k;
    "pooled_over_triplets": 100 / T.
    """
    category = np.asarray(category, np.int64)
    if criterion == "pooled_over_triplets":
        return np.full(category.shape[0], 100.0 / category.shape[0])
    if criterion == "mean_of_categories":
        counts = np.bincount(category, minlength=num_categories)
        return 100.0 / (num_categories * counts[category])
    raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {list(CRITERIA)}.")


def selection_groups(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Return the candidate rows of each choice: "overall", "combination" (2+ members) and "size_<s>"."""
    sizes = subsets.popcount(masks)
    groups = {"overall": np.arange(masks.shape[0])}
    if (sizes >= 2).any():
        groups["combination"] = np.flatnonzero(sizes >= 2)
    for size in np.unique(sizes).tolist():
        groups[f"size_{size}"] = np.flatnonzero(sizes == size)
    return groups


def _label(mask: int, names: Sequence[str]) -> str:
    return subsets.mask_label(int(mask), tuple(names))


def _cv_records(fold_scores: np.ndarray, masks: np.ndarray, names: Sequence[str], folds: np.ndarray,
                groups: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Cross-validate every group from per-fold scores x100 `[S, F]` and describe the choices."""
    cv = statistics.cross_validate(fold_scores[..., None], masks, groups, folds=folds)
    overall = fold_scores.sum(axis=1)
    out = {}
    for g, group in enumerate(cv.groups):
        best = int(cv.in_sample[g])
        held_out = float(cv.totals()[g, 0])
        out[group] = {
            "cross_validated": held_out,
            "in_sample_best": {"mask": int(masks[best]), "metrics": _label(masks[best], names),
                               "score": float(overall[best])},
            "optimism": float(overall[best]) - held_out,
            "times_chosen": [{"mask": int(masks[row]), "metrics": _label(masks[row], names), "folds": count}
                             for row, count in cv.times_chosen(group).items()],
        }
    return out


def cross_validate_subsets(d0: Any, d1: Any, judge: Any, category: Any, num_categories: int,
                           metric_names: Sequence[str], *, modes: Sequence[str] = metric_search.MODES,
                           num_folds: int, seed: int, max_subset_size: int | None = None,
                           topology: distributed.Topology | None = None) -> dict[str, Any]:
    """Cross-validate the choice of the best combination, per mode, criterion and group.

    One subset search over the (fold, category) cells gives every subset's
    per-fold totals. `statistics.cross_validate` then chooses each group's
    best subset on F - 1 folds and scores it on the held-out fold.

    Args:
      d0, d1: `[T, M]` distances.
      judge: `[T]` fraction of people who chose p1.
      category: int `[T]` category codes.
      num_categories: K.
      metric_names: `[M]` names.
      modes: search modes.
      num_folds: F >= 2.
      seed: seed of the fold assignment.
      max_subset_size: largest subset searched.
      topology: devices for the search.

    Returns:
      {"folds": F, "seed", "fold_sizes", "modes": {mode: {criterion: {group: record}}}}. A record
      contains the cross-validated score x100, the in-sample best, their difference
      ("optimism") and how many folds chose each subset.
    """
    category = np.asarray(category, np.int64)
    folds = statistics.assign_folds(category.shape[0], num_folds, seed=seed, strata=category)
    out: dict[str, Any] = {"folds": num_folds, "seed": seed,
                           "fold_sizes": np.bincount(folds, minlength=num_folds).tolist(), "modes": {}}
    for mode in modes:
        masks, totals, counts = metric_search.fold_category_totals(
            d0, d1, judge, category, num_categories, folds, num_folds, mode=mode,
            max_subset_size=max_subset_size, topology=topology)
        category_counts = counts.sum(axis=0)
        groups = selection_groups(masks)
        out["modes"][mode] = {}
        for criterion in CRITERIA:
            if criterion == "mean_of_categories":
                per_cell = 100.0 / (num_categories * category_counts)
            else:
                per_cell = np.full(num_categories, 100.0 / category_counts.sum())
            fold_scores = (totals * per_cell).sum(axis=2)
            out["modes"][mode][criterion] = _cv_records(fold_scores, masks, metric_names, folds, groups)
    return out


def cross_validate_taps(per_tap: Any, category: Any, num_categories: int, tap_names: Sequence[str], *,
                        num_folds: int, seed: int) -> dict[str, Any]:
    """Cross-validate the choice of a net's best single tap (same folds as `cross_validate_subsets`).

    Args:
      per_tap: `[L, T]` per-triplet scores of each single-tap distance.
      category: int `[T]` category codes.
      num_categories: K.
      tap_names: `[L]` labels.
      num_folds, seed: as in `cross_validate_subsets`.

    Returns:
      {criterion: record of the group "overall"}; ties go to the shallower tap.
    """
    per_tap = np.atleast_2d(np.asarray(per_tap, np.float64))
    category = np.asarray(category, np.int64)
    folds = statistics.assign_folds(category.shape[0], num_folds, seed=seed, strata=category)
    masks = np.left_shift(1, np.arange(per_tap.shape[0], dtype=np.int64))
    groups = {"overall": np.arange(per_tap.shape[0])}
    out = {}
    for criterion in CRITERIA:
        weighted = per_tap * criterion_weights(category, num_categories, criterion)
        fold_scores = statistics.fold_totals(weighted, folds, num_folds)
        out[criterion] = _cv_records(fold_scores, masks, tap_names, folds, groups)["overall"]
    return out


def select_on_train(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], masks: np.ndarray,
                    names: Sequence[str], groups: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Choose each group's best row on train and report its score on the evaluated split.

    Args:
      train: criterion -> float64 `[S]` scores x100 on the train split.
      test: criterion -> float64 `[S]` scores x100 of the same rows on the evaluated split.
      masks: int64 `[S]` masks (for tie-breaking and labels).
      names: names of the mask bits.
      groups: group -> candidate rows.

    Returns:
      {criterion: {group: {"chosen", "train_score", "held_out", "in_sample_best", "optimism"}}};
      "held_out" is the evaluated split's score of the subset chosen on train.
    """
    out = {}
    for criterion in CRITERIA:
        chosen = statistics.select_on_split(train[criterion], test[criterion], masks, groups)
        out[criterion] = {}
        for group, entry in chosen.items():
            row, best = entry["chosen_row"], entry["test_best_row"]
            out[criterion][group] = {
                "chosen": {"mask": int(masks[row]), "metrics": _label(masks[row], names)},
                "train_score": entry["train"][0],
                "held_out": entry["test"][0],
                "in_sample_best": {"mask": int(masks[best]), "metrics": _label(masks[best], names),
                                   "score": entry["test_best"][0]},
                "optimism": entry["test_best"][0] - entry["test"][0],
            }
    return out


def paired_comparison(per_item: Any, names: Sequence[str], judge: Any, category: Any, num_categories: int, *,
                      reference: int, num_resamples: int, level: float, seed: int) -> list[dict[str, Any]]:
    """Compare every row with the reference row on the same triplets (mean of categories x100).

    Args:
      per_item: `[S, T]` per-triplet 2AFC scores in [0, 1].
      names: `[S]` row labels.
      judge: `[T]` fraction of people who chose p1.
      category: int `[T]` category codes (the bootstrap strata).
      num_categories: K.
      reference: the row every other row is compared with.
      num_resamples: bootstrap resamples; 0 skips the intervals.
      level: interval coverage; the tests use the significance level 1 - level.
      seed: seed of the resamples.

    Returns:
      One record per row: score, interval, difference from the reference with
      its paired interval, the discordant majority triplets (wins, losses),
      the sign-test p-value, its Holm adjustment and "distinguishable".
    """
    per_item = np.atleast_2d(np.asarray(per_item, np.float64))
    judge = np.asarray(judge, np.float64)
    category = np.asarray(category, np.int64)
    statistics.check_level(level)
    weighted = per_item * criterion_weights(category, num_categories, "mean_of_categories")
    rows = np.arange(per_item.shape[0])
    resamples = None
    if num_resamples:
        resamples = statistics.resample_totals(weighted, num_resamples=num_resamples, level=level, seed=seed,
                                               strata=category)
        low, high = resamples.interval()
        difference, diff_low, diff_high = resamples.difference(rows, reference)
    else:
        difference = weighted.sum(axis=1) - weighted[reference].sum()

    # Agreement with a strict majority: the score exceeds 0.5 exactly when the
    # row prefers the side most people chose; h == 0.5 triplets always score 0.5.
    majority = judge != 0.5
    agrees = (per_item > 0.5) & majority
    wins, losses = statistics.discordant_counts(agrees, agrees[reference])
    p_values = statistics.sign_test(wins, losses)
    others = rows != reference
    adjusted = np.ones_like(p_values)
    adjusted[others] = statistics.holm_adjust(p_values[others])

    records = []
    for row in rows:
        record: dict[str, Any] = {
            "name": names[row], "score": float(weighted[row].sum()),
            "difference": float(difference[row]),
            "majority_wins": int(wins[row]), "majority_losses": int(losses[row]),
        }
        if resamples is not None:
            record["interval"] = [float(low[row]), float(high[row])]
            record["difference_interval"] = [float(diff_low[row]), float(diff_high[row])]
        if row != reference:
            record.update(p_value=float(p_values[row]), p_holm=float(adjusted[row]),
                          distinguishable=bool(adjusted[row] < 1.0 - level))
        else:
            record["reference"] = True
        records.append(record)
    return records


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_comparison_table(records: Sequence[Mapping[str, Any]], *, digits: int = 2) -> str:
    """Render `paired_comparison` records as Markdown, one row each."""
    lines = [_row(["", "mean of categories", "interval", "Δ vs reference", "Δ interval", "wins/losses",
                   "p (Holm)", "distinguishable"]), "|---|---|---|---|---|---|---|---|"]
    for r in records:
        interval = (f"[{r['interval'][0]:.{digits}f}, {r['interval'][1]:.{digits}f}]"
                    if "interval" in r else "n/a")
        diff_interval = (f"[{r['difference_interval'][0]:+.{digits}f}, {r['difference_interval'][1]:+.{digits}f}]"
                         if "difference_interval" in r else "n/a")
        if r.get("reference"):
            test, verdict, delta, diff_interval = "reference", "", "", ""
        else:
            test = f"{r['p_value']:.3g} ({r['p_holm']:.3g})"
            verdict = "yes" if r["distinguishable"] else "no"
            delta = f"{r['difference']:+.{digits}f}"
        lines.append(_row([r["name"], f"{r['score']:.{digits}f}", interval, delta, diff_interval,
                           f"{r['majority_wins']}/{r['majority_losses']}", test, verdict]))
    return "\n".join(lines) + "\n"


def format_selection_table(records: Mapping[str, Mapping[str, Any]], *, held_out_label: str,
                           digits: int = 2) -> str:
    """Render held-out selection records of one criterion ({group: record}) as Markdown."""
    lines = [_row(["choice", "in-sample best", "score", held_out_label, "optimism", "chosen"]),
             "|---|---|---|---|---|---|"]
    for group, r in records.items():
        held_out = r.get("cross_validated", r.get("held_out"))
        if "times_chosen" in r:
            chosen = ", ".join(f"{c['metrics']} ×{c['folds']}" for c in r["times_chosen"])
        else:
            chosen = f"{r['chosen']['metrics']} (train {r['train_score']:.{digits}f})"
        lines.append(_row([group.replace("_", " "), r["in_sample_best"]["metrics"],
                           f"{r['in_sample_best']['score']:.{digits}f}", f"{held_out:.{digits}f}",
                           f"{r['optimism']:+.{digits}f}", chosen]))
    return "\n".join(lines) + "\n"
