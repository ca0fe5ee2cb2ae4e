"""2AFC and JND scores of a distance on BAPPS-style human judgments.

Shapes use T for triplets (2AFC) or pairs (JND).

2AFC: a triplet (reference, p0, p1) carries h, the fraction of people who
judged p1 closer to the reference. A distance earns 1 - h when d0 < d1 (it
prefers p0), h when d1 < d0, and 0.5 when d0 == d1. A category's score is the
mean over its triplets, reported x100.

JND: a pair (p0, p1) carries s, the fraction of people who called the two
patches the same. Pairs are ranked by ascending distance. True positives are
the running sum of s and false positives the running sum of 1 - s, and the
score is the all-point (VOC 2010) average precision.

Everything here is float64 numpy. The comparisons are exact for whatever
precision the distances arrive in, and the means are taken in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CategoryScores",
    "jnd_average_precision",
    "jnd_average_precision_reference",
    "jnd_by_category",
    "two_afc_by_category",
    "two_afc_scores",
    "two_afc_scores_reference",
    "BootstrapIntervals",
    "bootstrap_two_afc",
    "category_codes",
    "format_scores_table",
]


def _as_vector(name: str, values: Any, length: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a vector [T], got shape {array.shape}.")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries but the distances have {length}; "
                         "pass one value per triplet, in the same order.")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name} contains a non-finite value at index {bad} ({array[bad]}); "
                         "recompute it or drop that triplet.")
    return array


def _check_fractions(name: str, values: np.ndarray) -> None:
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(f"{name} must be a fraction of people in [0, 1], "
                         f"got values in [{values.min()}, {values.max()}].")


def two_afc_scores(d0: Any, d1: Any, judge: Any) -> np.ndarray:
    """Score each triplet: 1 - h if d0 < d1, h if d1 < d0, 0.5 on a tie.

    Args:
      d0: `[T]` distance between the reference and p0.
      d1: `[T]` distance between the reference and p1.
      judge: `[T]` h in [0, 1], the fraction of people who chose p1.

    Returns:
      float64 `[T]` per-triplet scores in [0, 1]. Keep them for bootstrap
      intervals; a category's score is their mean.
    """
    d0 = _as_vector("d0", d0)
    d1 = _as_vector("d1", d1, d0.shape[0])
    judge = _as_vector("judge", judge, d0.shape[0]).astype(np.float64)
    _check_fractions("judge", judge)

    scores = np.full(d0.shape[0], 0.5, dtype=np.float64)
    prefers_p0 = d0 < d1
    prefers_p1 = d1 < d0
    scores[prefers_p0] = 1.0 - judge[prefers_p0]
    scores[prefers_p1] = judge[prefers_p1]
    return scores


def two_afc_scores_reference(d0: Any, d1: Any, judge: Any) -> np.ndarray:
    """Score triplets one at a time in Python floats; the test reference for `two_afc_scores`."""
    out = []
    for a, b, h in zip(np.asarray(d0).tolist(), np.asarray(d1).tolist(), np.asarray(judge).tolist()):
        if a < b:
            out.append(1.0 - h)
        elif b < a:
            out.append(h)
        else:
            out.append(0.5)
    return np.asarray(out, dtype=np.float64)


def category_codes(category: Any, names: Sequence[str]) -> np.ndarray:
    """Return int64 `[T]` codes into `names` for category labels given as codes or strings."""
    category = np.asarray(category)
    if category.ndim != 1:
        raise ValueError(f"category must be a vector [T], got shape {category.shape}.")
    names = list(names)
    if not names:
        raise ValueError("names is empty; pass the category names, one per code.")
    if len(set(names)) != len(names):
        raise ValueError(f"category names must be distinct, got {names}.")

    if category.dtype.kind in "iu":
        codes = category.astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
            raise ValueError(f"category codes must be in [0, {len(names) - 1}] to index names {names}, "
                             f"got values in [{codes.min()}, {codes.max()}].")
        return codes

    if category.dtype.kind in "UO":
        lookup = {name: code for code, name in enumerate(names)}
        unknown = sorted({str(c) for c in category.tolist()} - set(lookup))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; valid names: {names}.")
        return np.asarray([lookup[str(c)] for c in category.tolist()], dtype=np.int64)

    raise ValueError(f"category must hold int codes or strings, got dtype {category.dtype}.")


@dataclasses.dataclass(frozen=True)
class CategoryScores:
    """Scores of one distance per category, x100, with both overall averages.

    Attributes:
      names: category names, in report order.
      scores: score x100 per category, aligned with `names`.
      counts: triplets (or pairs) per category.
      mean_of_categories: unweighted mean of the category scores.
      pooled: the score over all triplets together, so larger categories
        weigh more (`None` for JND, where pooled AP is not reported).
      per_item: float64 `[T]` per-triplet 2AFC scores in [0, 1], in input
        order (`None` for JND), kept for bootstrap intervals.
      category: int64 `[T]` category codes into `names`, in input order.
    """

    names: tuple[str, ...]
    scores: tuple[float, ...]
    counts: tuple[int, ...]
    mean_of_categories: float
    pooled: float | None
    per_item: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    category: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def score(self, name: str) -> float:
        """Return the score x100 of category `name`."""
        if name not in self.names:
            raise KeyError(f"no category {name!r}; valid names: {list(self.names)}.")
        return self.scores[self.names.index(name)]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary (without the per-triplet arrays)."""
        return {
            "categories": {name: {"score": score, "count": count}
                           for name, score, count in zip(self.names, self.scores, self.counts)},
            "mean_of_categories": self.mean_of_categories,
            "pooled_over_triplets": self.pooled,
        }


def _counts_or_raise(codes: np.ndarray, names: Sequence[str]) -> np.ndarray:
    counts = np.bincount(codes, minlength=len(names))
    empty = [name for name, count in zip(names, counts) if count == 0]
    if empty:
        raise ValueError(f"categories {empty} have no triplets; pass only the names present in the data.")
    return counts


def two_afc_by_category(d0: Any, d1: Any, judge: Any, category: Any, names: Sequence[str]) -> CategoryScores:
    """Score a distance per category (x100), with the mean of categories and the pooled score.

    Args:
      d0: `[T]` distance between the reference and p0.
      d1: `[T]` distance between the reference and p1.
      judge: `[T]` fraction of people who chose p1.
      category: `[T]` int codes into `names`, or the category names as strings.
      names: the category names, in report order; each must have a triplet.

    Returns:
      `CategoryScores`, whose `per_item` is the `[T]` per-triplet scores.
    """
    per_triplet = two_afc_scores(d0, d1, judge)
    codes = category_codes(category, names)
    if codes.shape[0] != per_triplet.shape[0]:
        raise ValueError(f"category has {codes.shape[0]} entries but the distances have {per_triplet.shape[0]}.")
    counts = _counts_or_raise(codes, names)

    sums = np.bincount(codes, weights=per_triplet, minlength=len(names))
    category_scores = 100.0 * sums / counts
    return CategoryScores(
        names=tuple(names),
        scores=tuple(float(s) for s in category_scores),
        counts=tuple(int(c) for c in counts),
        mean_of_categories=float(np.mean(category_scores)),
        pooled=float(100.0 * per_triplet.mean()),
        per_item=per_triplet,
        category=codes,
    )


def jnd_average_precision(distance: Any, same: Any) -> float:
    """Return the all-point average precision of ranking pairs by ascending distance.

    True positives are the running sum of `same` and false positives of
    1 - `same`. Pairs with equal distances form one threshold: precision and
    recall are taken only after the whole group, so the result does not depend
    on the input order. NOTE: the `lpips` package (0.1.4) sorts with an
    unstable argsort and evaluates every position. On tied distances its value
    therefore depends on the order of the pairs. Without ties the two agree.

    Args:
      distance: `[T]` distance between p0 and p1.
      same: `[T]` fraction of people who called the pair the same, in [0, 1].

    Returns:
      Average precision in [0, 1] (not x100).
    """
    distance = _as_vector("distance", distance)
    same = _as_vector("same", same, distance.shape[0]).astype(np.float64)
    _check_fractions("same", same)
    total_same = same.sum()
    if distance.shape[0] == 0 or total_same <= 0.0:
        raise ValueError("JND average precision needs at least one pair with same > 0; "
                         f"got {distance.shape[0]} pairs with sum(same) = {total_same}.")

    order = np.argsort(distance, kind="stable")
    sorted_distance = distance[order]
    true_positives = np.cumsum(same[order])
    false_positives = np.cumsum(1.0 - same[order])

    # Keep the last position of each run of equal distances.
    group_end = np.ones(distance.shape[0], dtype=bool)
    group_end[:-1] = sorted_distance[1:] != sorted_distance[:-1]
    true_positives = true_positives[group_end]
    false_positives = false_positives[group_end]

    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / total_same

    padded_recall = np.concatenate(([0.0], recall, [1.0]))
    padded_precision = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(padded_precision[::-1])[::-1]
    steps = np.flatnonzero(padded_recall[1:] != padded_recall[:-1])
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


def jnd_average_precision_reference(distance: Any, same: Any) -> float:
    """Compute the same average precision with Python loops; the test reference.

    Ties are grouped exactly as in `jnd_average_precision`: a threshold is
    placed only between distinct distances.
    """
    pairs = sorted(zip(np.asarray(distance).tolist(), np.asarray(same).tolist()), key=lambda p: p[0])
    total_same = sum(s for _, s in pairs)
    points = []
    tp = fp = 0.0
    for i, (d, s) in enumerate(pairs):
        tp += s
        fp += 1.0 - s
        if i + 1 == len(pairs) or pairs[i + 1][0] != d:
            points.append((tp / total_same, tp / (tp + fp)))

    recalls = [0.0] + [r for r, _ in points] + [1.0]
    precisions = [0.0] + [p for _, p in points] + [0.0]
    for i in range(len(precisions) - 2, -1, -1):
        precisions[i] = max(precisions[i], precisions[i + 1])
    ap = 0.0
    for i in range(len(recalls) - 1):
        if recalls[i + 1] != recalls[i]:
            ap += (recalls[i + 1] - recalls[i]) * precisions[i + 1]
    return ap


def jnd_by_category(distance: Any, same: Any, category: Any, names: Sequence[str]) -> CategoryScores:
    """Return the JND average precision (x100) per category and their mean.

    Args:
      distance: `[T]` distance between p0 and p1.
      same: `[T]` fraction of people who called the pair the same.
      category: `[T]` int codes into `names`, or category names as strings.
      names: the category names, in report order; each must have a pair.
    """
    distance = _as_vector("distance", distance)
    same = _as_vector("same", same, distance.shape[0])
    codes = category_codes(category, names)
    if codes.shape[0] != distance.shape[0]:
        raise ValueError(f"category has {codes.shape[0]} entries but the distances have {distance.shape[0]}.")
    counts = _counts_or_raise(codes, names)

    category_scores = [100.0 * jnd_average_precision(distance[codes == c], same[codes == c])
                       for c in range(len(names))]
    return CategoryScores(
        names=tuple(names),
        scores=tuple(category_scores),
        counts=tuple(int(c) for c in counts),
        mean_of_categories=float(np.mean(category_scores)),
        pooled=None,
        per_item=None,
        category=codes,
    )


def format_scores_table(results: dict[str, CategoryScores], *, digits: int = 2) -> str:
    """Render scores of several distances as a Markdown table, one row per distance.

    Columns are the categories of the first result, then the mean of
    categories and, for 2AFC, the score pooled over all triplets.

    Args:
      results: distance name -> its `CategoryScores`, in row order; all must
        share the same category names.
      digits: decimals shown.
    """
    if not results:
        raise ValueError("results is empty; pass at least one distance's scores.")
    first = next(iter(results.values()))
    pooled = first.pooled is not None
    header = ["distance", *first.names, "mean of categories"] + (["pooled over triplets"] if pooled else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        if result.names != first.names:
            raise ValueError(f"{name!r} has categories {list(result.names)}, expected {list(first.names)}.")
        cells = [name, *(f"{s:.{digits}f}" for s in result.scores), f"{result.mean_of_categories:.{digits}f}"]
        if pooled:
            cells.append(f"{result.pooled:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile bootstrap intervals of 2AFC scores (x100), resampling triplets within each category.

    Attributes:
      names: category names.
      level: the coverage, e.g. 0.95.
      num_resamples: bootstrap resamples drawn.
      estimate: float64 `[M, K + 2]` scores on the data itself; columns are the
        categories, then the mean of categories, then the pooled score.
      low: float64 `[M, K + 2]` lower interval ends.
      high: float64 `[M, K + 2]` upper interval ends.
    """

    names: tuple[str, ...]
    level: float
    num_resamples: int
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def columns(self) -> list[str]:
        return [*self.names, "mean_of_categories", "pooled_over_triplets"]

    def to_dict(self, row_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Return a JSON-serialisable summary, one entry per row (named by `row_names`)."""
        row_names = list(row_names) if row_names is not None else [str(r) for r in range(self.estimate.shape[0])]
        return {
            "level": self.level,
            "num_resamples": self.num_resamples,
            "rows": {name: {column: {"estimate": float(e), "low": float(lo), "high": float(hi)}
                            for column, e, lo, hi in zip(self.columns(), est, low, high)}
                     for name, est, low, high in zip(row_names, self.estimate, self.low, self.high)},
        }


def bootstrap_two_afc(per_item: Any, category: Any, names: Sequence[str], *, num_resamples: int = 1000,
                      level: float = 0.95, seed: int = 0) -> BootstrapIntervals:
    """Bootstrap 2AFC scores of M distances with the same resampled triplets (paired).

    Triplets are resampled with replacement within each category, so every
    resample keeps the category sizes. All rows share the same resamples. For
    a paired interval of the difference between two distances, pass the
    difference of their per-triplet scores as a row. That row's values are
    then differences x100, not scores.

    Args:
      per_item: `[T]` or `[M, T]` per-triplet scores in [0, 1] (for example
        `CategoryScores.per_item`), or per-triplet differences of two distances.
      category: `[T]` int codes into `names`, or names as strings.
      names: the category names, each with at least one triplet.
      num_resamples: bootstrap resamples.
      level: interval coverage in (0, 1).
      seed: seed of the resampling.

    Returns:
      `BootstrapIntervals` with percentile intervals per row and column.
    """
    per_item = np.atleast_2d(np.asarray(per_item, dtype=np.float64))
    codes = category_codes(category, names)
    if per_item.ndim != 2 or per_item.shape[1] != codes.shape[0]:
        raise ValueError(f"per_item must be [T] or [M, T] with T = {codes.shape[0]} (the category length), "
                         f"got shape {per_item.shape}.")
    if not 0.0 < level < 1.0 or num_resamples < 1:
        raise ValueError(f"level must be in (0, 1) and num_resamples >= 1, got {level} and {num_resamples}.")
    counts = _counts_or_raise(codes, names)

    rng = np.random.default_rng(seed)
    resampled = np.zeros((per_item.shape[0], num_resamples, len(names)))
    estimate = np.zeros((per_item.shape[0], len(names)))
    for c in range(len(names)):
        members = np.flatnonzero(codes == c)
        values = per_item[:, members]
        estimate[:, c] = values.mean(axis=1)
        # How often each triplet is drawn in each resample: [B, n_c], n_c draws per row.
        draws = rng.multinomial(members.shape[0], np.full(members.shape[0], 1.0 / members.shape[0]),
                                size=num_resamples)
        resampled[:, :, c] = values @ draws.T / members.shape[0]

    def with_overall(category_means: np.ndarray) -> np.ndarray:
        mean = category_means.mean(axis=-1, keepdims=True)
        pooled = (category_means * counts).sum(axis=-1, keepdims=True) / counts.sum()
        return 100.0 * np.concatenate([category_means, mean, pooled], axis=-1)

    tail = 100.0 * (1.0 - level) / 2.0
    samples = with_overall(resampled)
    return BootstrapIntervals(
        names=tuple(names), level=level, num_resamples=num_resamples, estimate=with_overall(estimate),
        low=np.percentile(samples, tail, axis=1), high=np.percentile(samples, 100.0 - tail, axis=1))
