"""Intervals, held-out selection and paired tests for a retrieval subset search.

Everything is computed from the per-query capped ranks [S, N] that
`engine.retrieval.search` keeps, so no statistic needs a second pass over
the similarities. `annotate` adds to the analyses of `engine.analysis`:

- to every reported subset record (single representations, best per size,
  leading subsets, ablation): the percentile bootstrap interval of its
  recall counts;
- to every leading subset, best-per-size entry and ablation entry: the paired
  comparison with the best subset at the first K. It contains the difference,
  its paired bootstrap interval, the discordant queries, the exact McNemar
  p-value and the Holm-adjusted p-value within that list. The entry is
  distinguishable from the best when the adjusted p < 1 − level;
- per mode, k-fold cross-validation over queries: the best subset overall and
  of each size chosen on the other folds and scored on the held-out fold,
  next to the in-sample best, with how often each subset was chosen.

`compare_fitted` adds the comparison of fitted weights (engine.weight_fit)
with the cross-validated best subset and with equal standardised weights,
on the same folds and queries.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from engine import retrieval, statistics, subsets

__all__ = ["SearchStatistics", "annotate", "compare_fitted", "compute", "has_equal_standardized"]

OVERALL = "overall"


@dataclasses.dataclass
class SearchStatistics:
    """Settings and per-mode results of the statistics of one search.

    Attributes:
      num_resamples: bootstrap resamples (0: no intervals).
      level: interval coverage; paired tests use the significance level 1 − level.
      seed: seed of the folds and resamples.
      folds: int64 [N] fold of each query, or None without cross-validation.
      cross_validation: mode -> CrossValidation over the groups "overall" and "size_<s>".
      seconds: wall time per stage.
      skipped: why an analysis that was asked for did not run, or None.
    """

    num_resamples: int
    level: float
    seed: int
    folds: np.ndarray | None
    cross_validation: dict[str, statistics.CrossValidation]
    seconds: dict[str, float]
    skipped: str | None = None

    @property
    def num_folds(self) -> int:
        return 0 if self.folds is None else int(self.folds.max()) + 1

    def held_out_ranks(self, result: retrieval.SearchResult, mode: str, group: str = OVERALL) -> np.ndarray:
        """Return int64 [N]: each query's capped rank under the subset chosen without its fold."""
        cv = self.cross_validation[mode]
        rows = cv.item_rows(self.folds)[cv.groups.index(group)]
        return result.modes[mode].ranks[rows, np.arange(result.num_queries)].astype(np.int64)


def _size_groups(result: retrieval.SearchResult) -> dict[str, np.ndarray]:
    sizes = result.sizes()
    groups = {OVERALL: np.arange(result.masks.size)}
    for size in np.unique(sizes).tolist():
        groups[f"size_{size}"] = np.flatnonzero(sizes == size)
    return groups


def compute(result: retrieval.SearchResult, *, num_resamples: int = 1000, level: float = 0.95, cv_folds: int = 5,
            seed: int = 0) -> SearchStatistics:
    """Run the cross-validation of a search (the bootstrap runs in `annotate`).

    Args:
      result: the search.
      num_resamples: bootstrap resamples for `annotate`; 0 disables intervals.
      level: interval coverage in (0, 1).
      cv_folds: folds over queries; 0 disables cross-validation.
      seed: seed of the folds and the resamples.
    """
    statistics.check_level(level)
    if num_resamples < 0:
        raise ValueError(f"--bootstrap must be >= 0 resamples, got {num_resamples}.")
    seconds: dict[str, float] = {}
    folds = None
    cross_validation = {}
    skipped = None
    reduced = [mode for mode, mode_result in result.modes.items()
               if mode_result.rank_masks is not None and mode_result.rank_masks.size < result.masks.size]
    if cv_folds and reduced:
        # Fold counts need every subset's per-query ranks; this run kept only some.
        skipped = (f"cross-validation skipped: modes {reduced} kept per-query ranks for only some subsets "
                   "because all of them did not fit the memory budget; raise --memory_budget_gb to run it.")
        logging.warning("%s", skipped)
        cv_folds = 0
    if cv_folds:
        start = time.perf_counter()
        folds = statistics.assign_folds(result.num_queries, cv_folds, seed=seed)
        groups = _size_groups(result)
        for mode, mode_result in result.modes.items():
            counts = statistics.rank_fold_counts(mode_result.ranks, folds, cv_folds, result.ks)
            cross_validation[mode] = statistics.cross_validate(counts, result.masks, groups, folds=folds)
        seconds["cross_validation"] = time.perf_counter() - start
    return SearchStatistics(num_resamples=num_resamples, level=level, seed=seed, folds=folds,
                            cross_validation=cross_validation, seconds=seconds, skipped=skipped)


# ----------------------------------------------------------------------------
# Annotating the analyses.


def _subset_records(mode_out: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every subset record of one mode's analyses that carries recall counts."""
    yield from mode_out["singles"]
    yield from mode_out["best_per_size"]
    yield from mode_out["top_subsets"]
    yield mode_out["best"]
    for entry in mode_out["ablation"]:
        if entry["best_without"] is not None:
            yield entry["best_without"]


def _paired_entries(mode_out: dict[str, Any]) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Return, per family, (record to compare with the best, dict that receives the result)."""
    best_mask = mode_out["best"]["mask"]
    return {
        "top_subsets": [(r, r) for r in mode_out["top_subsets"] if r["mask"] != best_mask],
        "best_per_size": [(r, r) for r in mode_out["best_per_size"] if r["mask"] != best_mask],
        "ablation": [(e["best_without"], e) for e in mode_out["ablation"] if e["best_without"] is not None],
    }


def annotate(result: retrieval.SearchResult, analyses: dict[str, Any], stats: SearchStatistics
             ) -> dict[str, Any]:
    """Return a copy of `analyses` with intervals, paired tests and cross-validation added.

    Args:
      result: the search.
      analyses: the output of `engine.analysis.analyse` for `result`.
      stats: the output of `compute`.
    """
    out = copy.deepcopy(analyses)
    start = time.perf_counter()
    for mode, mode_out in out["modes"].items():
        _annotate_mode(result, mode, mode_out, stats)
    stats.seconds["bootstrap_and_paired_tests"] = time.perf_counter() - start
    out["statistics"] = _settings(result, stats)
    return out


def _settings(result: retrieval.SearchResult, stats: SearchStatistics) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "seed": stats.seed,
        "level": stats.level,
        "bootstrap": {
            "num_resamples": stats.num_resamples,
            "method": "percentile bootstrap over queries; every interval and difference uses the same resamples",
        } if stats.num_resamples else None,
        "paired_test": {
            "method": "exact McNemar test (two-sided binomial on the discordant queries) at the first K",
            "k": result.ks[0],
            "alpha": 1.0 - stats.level,
            "multiple_comparisons": "Holm within each list (leading subsets, best per size, ablation)",
        },
        "cross_validation": None,
        "skipped": stats.skipped,
        "seconds": stats.seconds,
    }
    if stats.folds is not None:
        settings["cross_validation"] = {
            "folds": stats.num_folds,
            "fold_sizes": np.bincount(stats.folds, minlength=stats.num_folds).tolist(),
            "method": ("queries split at random into folds; on each fold the best subset overall and of each "
                       "size is chosen on the other folds and scored on the held-out fold; the cross-validated "
                       "recall is the sum of the held-out counts"),
        }
    return settings


def _recall_fields(ks: tuple[int, ...], totals: np.ndarray) -> dict[str, int]:
    return {f"recall_at_{k}": int(round(float(v))) for k, v in zip(ks, totals)}


def _interval_fields(ks: tuple[int, ...], low: np.ndarray, high: np.ndarray) -> dict[str, list[float]]:
    return {f"recall_at_{k}": [float(lo), float(hi)] for k, lo, hi in zip(ks, low, high)}


def _annotate_mode(result: retrieval.SearchResult, mode: str, mode_out: dict[str, Any],
                   stats: SearchStatistics) -> None:
    ks = result.ks
    mode_result = result.modes[mode]
    records = list(_subset_records(mode_out))
    masks = sorted({r["mask"] for r in records})
    rows = np.arange(len(masks))
    position = {mask: i for i, mask in enumerate(masks)}
    best_position = position[mode_out["best"]["mask"]]

    # Rows of the bootstrap: the reported subsets, then the cross-validated selections.
    capped = [np.stack([mode_result.ranks_of(mask) for mask in masks]).astype(np.int64)]
    cv = stats.cross_validation.get(mode)
    if cv is not None:
        capped.append(np.stack([stats.held_out_ranks(result, mode, group) for group in cv.groups]))
    capped = np.concatenate(capped)
    resamples = None
    if stats.num_resamples:
        bits = np.concatenate([capped < k for k in ks])                  # [K * rows, N]
        resamples = statistics.resample_totals(bits, num_resamples=stats.num_resamples, level=stats.level,
                                               seed=stats.seed)
        low, high = (v.reshape(len(ks), -1) for v in resamples.interval())
        for record in records:
            i = position[record["mask"]]
            record["interval"] = _interval_fields(ks, low[:, i], high[:, i])

    first_bits = capped < ks[0]
    for family, entries in _paired_entries(mode_out).items():
        if not entries:
            continue
        compared = np.array([position[record["mask"]] for record, _ in entries])
        tests = _paired_tests(first_bits, compared, best_position, resamples, stats.level)
        for (_, target), test in zip(entries, tests):
            target["versus_best"] = test
    if cv is not None:
        mode_out["cross_validation"] = _cross_validation_out(
            result, mode, cv, capped[len(rows):], resamples, len(rows), stats)


def _paired_tests(bits: np.ndarray, compared: np.ndarray, reference: int,
                  resamples: statistics.Resamples | None, level: float) -> list[dict[str, Any]]:
    """Paired comparison of rows `compared` of 0/1 outcomes [S, N] with row `reference` (first K)."""
    wins, losses = statistics.discordant_counts(bits[compared], bits[reference])
    p_values = statistics.sign_test(wins, losses)
    adjusted = statistics.holm_adjust(p_values)
    out = []
    for j in range(compared.size):
        test: dict[str, Any] = {
            "difference": int(wins[j] - losses[j]),
            "only_this": int(wins[j]),
            "only_best": int(losses[j]),
            "p_value": float(p_values[j]),
            "p_value_holm": float(adjusted[j]),
            "distinguishable": bool(adjusted[j] < 1.0 - level),
        }
        if resamples is not None:
            # Row i of the first K's outcomes is row i of the resampled totals.
            _, low, high = resamples.difference([compared[j]], reference)
            test["difference_interval"] = [float(low[0]), float(high[0])]
        out.append(test)
    return out


def _cross_validation_out(result, mode, cv: statistics.CrossValidation, held_ranks: np.ndarray,
                          resamples: statistics.Resamples | None, offset: int, stats: SearchStatistics
                          ) -> dict[str, Any]:
    ks = result.ks
    recall = result.modes[mode].recall
    num_rows = resamples.samples.shape[1] // len(ks) if resamples is not None else 0
    if resamples is not None:
        low, high = (v.reshape(len(ks), num_rows) for v in resamples.interval())
    groups = {}
    cv_totals = cv.totals()
    for g, group in enumerate(cv.groups):
        in_sample_row = int(cv.in_sample[g])
        entry: dict[str, Any] = {
            "in_sample_best": {"mask": int(result.masks[in_sample_row]),
                               "representations": subsets.mask_label(int(result.masks[in_sample_row]), result.names),
                               **_recall_fields(ks, recall[in_sample_row])},
            "cross_validated": _recall_fields(ks, cv_totals[g]),
            "optimism": int(recall[in_sample_row, 0] - round(float(cv_totals[g, 0]))),
            "folds": [{"mask": int(result.masks[row]),
                       "representations": subsets.mask_label(int(result.masks[row]), result.names),
                       "queries": int(cv.fold_sizes[f]),
                       **_recall_fields(ks, cv.held_out[g, f])}
                      for f, row in enumerate(cv.chosen[g].tolist())],
            "times_chosen": [{"mask": int(result.masks[row]),
                              "representations": subsets.mask_label(int(result.masks[row]), result.names),
                              "folds": count}
                             for row, count in cv.times_chosen(group).items()],
        }
        if resamples is not None:
            entry["cross_validated_interval"] = _interval_fields(ks, low[:, offset + g], high[:, offset + g])
        groups[group] = entry
    return {"overall": groups[OVERALL],
            "by_size": [dict(size=int(name.split("_")[1]), **entry) for name, entry in groups.items()
                        if name != OVERALL]}


# ----------------------------------------------------------------------------
# Fitted weights.


def has_equal_standardized(result: retrieval.SearchResult) -> bool:
    """Return whether the search scored equal standardised weights (the all-member standardised subset)."""
    full = (1 << len(result.names)) - 1
    return retrieval.STANDARDIZED in result.modes and bool(np.any(result.masks == full))


def compare_fitted(result: retrieval.SearchResult, stats: SearchStatistics, names: tuple[str, ...],
                   standardized_weights: np.ndarray, raw_weights: np.ndarray,
                   held_out: dict[str, np.ndarray], near_ties: dict[str, int], *, fitted: str = "fitted",
                   equal: str | None = None) -> dict[str, Any]:
    """Compare held-out fitted weights with the cross-validated best subsets and equal standardised weights.

    All rows are scored on the same queries with the same folds, so the
    comparison is paired: recall with its interval per row, and the paired
    test of each comparison row against the fitted weights at the first K.

    Args:
      result: the search (its folds are in `stats`).
      stats: the statistics, with cross-validation.
      names: representation names.
      standardized_weights: float64 [F, M] fitted weights of the standardised similarities per fold.
      raw_weights: float64 [F, M] the same as weights of the raw similarities.
      held_out: mode name -> int64 [N] capped held-out ranks (from `weight_fit.cross_validate_weights`).
      near_ties: mode name -> near-tie count of the held-out scoring.
      fitted: the key of the fitted weights in `held_out`.
      equal: the key of equal standardised weights in `held_out`; None uses the
        search's all-member standardised subset when it was searched
        (`has_equal_standardized`) and leaves the row out otherwise.
    """
    if stats.folds is None:
        raise ValueError("fitted weights are scored on held-out folds; enable cross-validation (--cv_folds >= 2).")
    ks = result.ks
    labels = ["fitted weights (held out)"]
    capped = [held_out[fitted]]
    if equal is not None:
        labels.append("equal standardised weights")
        capped.append(held_out[equal])
    elif has_equal_standardized(result):
        labels.append("equal standardised weights")
        full = (1 << len(names)) - 1
        capped.append(result.modes[retrieval.STANDARDIZED].ranks_of(full).astype(np.int64))
    for mode in result.modes:
        labels.append(f"cross-validated best subset ({mode})")
        capped.append(stats.held_out_ranks(result, mode))
    capped = np.stack(capped)

    recall = np.stack([(capped < k).sum(axis=1) for k in ks], axis=1)        # [rows, K]
    rows: list[dict[str, Any]] = [{"label": label, **_recall_fields(ks, recall[i])} for i, label in enumerate(labels)]
    resamples = None
    if stats.num_resamples:
        bits = np.concatenate([capped < k for k in ks])
        resamples = statistics.resample_totals(bits, num_resamples=stats.num_resamples, level=stats.level,
                                               seed=stats.seed)
        low, high = (v.reshape(len(ks), -1) for v in resamples.interval())
        for i, row in enumerate(rows):
            row["interval"] = _interval_fields(ks, low[:, i], high[:, i])
    tests = _paired_tests(capped < ks[0], np.arange(1, len(labels)), 0, resamples, stats.level)
    for row, test in zip(rows[1:], tests):
        # Reported as fitted minus the other row, so a positive difference favours the fitted weights.
        row["fitted_versus_this"] = {
            "difference": -test["difference"], "only_fitted": test["only_best"], "only_this": test["only_this"],
            "p_value": test["p_value"], "p_value_holm": test["p_value_holm"],
            "distinguishable": test["distinguishable"],
            **({"difference_interval": [-test["difference_interval"][1], -test["difference_interval"][0]]}
               if "difference_interval" in test else {}),
        }
    logging.info("held-out recall@%d: %s", ks[0],
                 "; ".join(f"{row['label']} {row[f'recall_at_{ks[0]}']}" for row in rows))
    return {
        "representations": list(names),
        "standardized_weights_per_fold": standardized_weights.tolist(),
        "raw_weights_per_fold": raw_weights.tolist(),
        "standardized_weights_mean": standardized_weights.mean(axis=0).tolist(),
        "near_ties": dict(near_ties),
        "comparison": rows,
    }
