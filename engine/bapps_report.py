"""Every BAPPS analysis of one split, computed from cached profiles and baselines, and its report.

From the per-category arrays of `engine.bapps_pipeline` this module builds the
metric distances: each net's calibrated, uncalibrated and single-tap
weightings, L2 and SSIM. It scores them (2AFC per category x100 with both
overall averages, or JND average precision) and runs the single-layer sweep,
the metric-combination search and the fitted channel weighting. It renders
`scores.csv`, `distances.csv`, `summary.json` and `report.md`.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine import calibration, lpips, metric_search, scores, store


@dataclasses.dataclass(frozen=True)
class NetInfo:
    """A net's tap channel counts [L], per-tap calibration weights ([C_l] each, None when not loaded) and tap names."""

    channels: tuple[int, ...]
    linear_weights: tuple[np.ndarray, ...] | None
    tap_names: tuple[str, ...] | None = None

    @property
    def calibrated(self) -> np.ndarray | None:
        """The calibration weights concatenated, [C], or None."""
        if self.linear_weights is None:
            return None
        return lpips.calibrated_weights(self.linear_weights, self.channels)


@dataclasses.dataclass
class SplitTable:
    """One split's data, categories concatenated in run order.

    Attributes:
      task: "2afc" or "jnd".
      split: split name.
      category_names: [K] names.
      category: int64 [T] codes into `category_names`.
      stems: [T] file stems.
      labels: [T] judge (2AFC) or same (JND).
      profiles: net -> (profile0, profile1) for 2AFC or (profile,) for JND, [T, C] each.
      distances: metric -> (d0, d1) for 2AFC or (d,) for JND, [T] each, float64.
    """

    task: str
    split: str
    category_names: tuple[str, ...]
    category: np.ndarray
    stems: np.ndarray
    labels: np.ndarray
    profiles: dict[str, tuple[np.ndarray, ...]]
    distances: dict[str, tuple[np.ndarray, ...]]


def assemble(task: str, split: str, categories: Sequence[Any], nets: Mapping[str, NetInfo]) -> SplitTable:
    """Concatenate the categories' arrays and compute every metric's distances.

    Metric order: per net NET-lin, NET, NET-l0 .. NET-l{L-1}; then the baselines.
    """
    sides = ("profile0", "profile1") if task == "2afc" else ("profile",)
    baseline_sides = ("d0", "d1") if task == "2afc" else ("d",)
    profiles = {net: tuple(np.concatenate([c.profiles[net][s] for c in categories]) for s in sides)
                for net in nets}
    distances: dict[str, tuple[np.ndarray, ...]] = {}
    for net, info in nets.items():
        weightings = lpips.metric_weightings(net, info.channels, info.linear_weights)
        matrix = np.stack(list(weightings.values()), axis=1)
        per_side = [lpips.distance(p, matrix) for p in profiles[net]]
        for k, name in enumerate(weightings):
            distances[name] = tuple(d[:, k] for d in per_side)
    baseline_names = list(categories[0].baselines) if categories else []
    for name in baseline_names:
        distances[name] = tuple(
            np.concatenate([c.baselines[name][s] for c in categories]).astype(np.float64) for s in baseline_sides)
    return SplitTable(
        task=task, split=split,
        category_names=tuple(c.name for c in categories),
        category=np.concatenate([np.full(len(c.stems), k, np.int64) for k, c in enumerate(categories)]),
        stems=np.concatenate([np.asarray(c.stems, dtype=str) for c in categories]),
        labels=np.concatenate([c.labels for c in categories]).astype(np.float64),
        profiles=profiles, distances=distances)


def score_metrics(table: SplitTable) -> dict[str, scores.CategoryScores]:
    """Score every metric: 2AFC x100 per category, or JND average precision x100."""
    if table.task == "2afc":
        return {name: scores.two_afc_by_category(d0, d1, table.labels, table.category, table.category_names)
                for name, (d0, d1) in table.distances.items()}
    return {name: scores.jnd_by_category(d, table.labels, table.category, table.category_names)
            for name, (d,) in table.distances.items()}


def default_search_metrics(table: SplitTable, nets: Sequence[str], *, single_taps: bool = False) -> list[str]:
    """Return the combination-search metrics: each net's -lin and uncalibrated distance, L2 and SSIM."""
    names = []
    for net in nets:
        names += [n for n in (f"{net}-lin", net) if n in table.distances]
        if single_taps:
            names += [n for n in table.distances if n.startswith(f"{net}-l") and n[len(net) + 2:].isdigit()]
    return names + [n for n in ("l2-lab", "l2-rgb", "ssim") if n in table.distances]


@dataclasses.dataclass
class Analyses:
    """Results of every analysis of a split; fields are None when an analysis did not run."""

    metric_scores: dict[str, scores.CategoryScores]
    intervals: scores.BootstrapIntervals | None = None
    sweeps: list[metric_search.SingleLayerSweep] | None = None
    search: metric_search.SubsetSearchResult | None = None
    fits: list[dict[str, Any]] | None = None


def run_analyses(
    table: SplitTable,
    nets: Mapping[str, NetInfo],
    *,
    search_metrics: Sequence[str] | None = None,
    max_subset_size: int | None = None,
    train: SplitTable | None = None,
    l1_values: Sequence[float] = (0.0,),
    fit_steps: int = 500,
    seed: int = 0,
    bootstrap_resamples: int = 0,
) -> Analyses:
    """Run the scores and, for 2AFC, the single-layer sweep, the combination search and the fits.

    Args:
      table: the evaluated split.
      nets: the nets whose profiles `table` holds.
      search_metrics: metric names for the combination search; None searches
        `default_search_metrics`, an empty list skips the search.
      max_subset_size: largest combination searched.
      train: a 2AFC split to fit channel weightings on (evaluated on `table`);
        None skips the fits.
      l1_values: L1 penalties, one fit per net and value.
      fit_steps: optimiser steps per fit.
      seed: seed of the fits and the bootstrap.
      bootstrap_resamples: resamples of the paired bootstrap intervals of
        every metric's 2AFC scores (triplets resampled within categories); 0 skips them.
    """
    analyses = Analyses(metric_scores=score_metrics(table))
    if table.task != "2afc":
        return analyses

    if bootstrap_resamples:
        per_item = np.stack([result.per_item for result in analyses.metric_scores.values()])
        analyses.intervals = scores.bootstrap_two_afc(
            per_item, table.category, table.category_names, num_resamples=bootstrap_resamples, seed=seed)

    analyses.sweeps = [
        metric_search.single_layer_sweep(
            *table.profiles[net], table.labels, table.category, info.channels, info.calibrated,
            category_names=table.category_names, net=net, tap_names=info.tap_names)
        for net, info in nets.items()]

    names = default_search_metrics(table, list(nets)) if search_metrics is None else list(search_metrics)
    unknown = [n for n in names if n not in table.distances]
    if unknown:
        raise ValueError(f"unknown search metric(s) {unknown}; valid names: {list(table.distances)}.")
    if names:
        d0 = np.stack([table.distances[n][0] for n in names], axis=1)
        d1 = np.stack([table.distances[n][1] for n in names], axis=1)
        analyses.search = metric_search.search_metric_subsets(
            d0, d1, table.labels, table.category, len(table.category_names), max_subset_size=max_subset_size,
            metric_names=names, category_names=table.category_names)

    if train is not None:
        analyses.fits = []
        for net in nets:
            for l1 in l1_values:
                fit = calibration.fit_channel_weights(
                    *train.profiles[net], train.labels, l1=l1, steps=fit_steps, seed=seed)
                d0, d1 = (lpips.distance(p, fit.weights) for p in table.profiles[net])
                analyses.fits.append({
                    "label": f"{net}, fitted on {train.split}, l1={l1:g}", "net": net, "fit": fit,
                    "scores": scores.two_afc_by_category(d0, d1, table.labels, table.category,
                                                         table.category_names),
                    "nonzero_per_tap": calibration.nonzero_per_tap(fit.weights, nets[net].channels)})
    return analyses


def summary_dict(table: SplitTable, analyses: Analyses) -> dict[str, Any]:
    """Return the JSON-serialisable results of every analysis."""
    summary: dict[str, Any] = {
        "task": table.task, "split": table.split,
        "categories": {n: int((table.category == k).sum()) for k, n in enumerate(table.category_names)},
        "score_unit": "2AFC agreement x100" if table.task == "2afc" else "JND average precision x100",
        "scores": {name: result.to_dict() for name, result in analyses.metric_scores.items()},
    }
    if analyses.intervals is not None:
        summary["bootstrap_intervals"] = analyses.intervals.to_dict(list(analyses.metric_scores))
    if analyses.sweeps is not None:
        summary["single_layer"] = [sweep.to_dict() for sweep in analyses.sweeps]
    if analyses.search is not None:
        summary["combinations"] = analyses.search.to_dict()
    if analyses.fits is not None:
        summary["fitted_weightings"] = [
            {"label": row["label"], "net": row["net"], **row["fit"].to_dict(),
             "nonzero_per_tap": row["nonzero_per_tap"], "val_scores": row["scores"].to_dict()}
            for row in analyses.fits]
    return summary


def markdown_report(table: SplitTable, analyses: Analyses, *, header: str = "") -> str:
    """Render the report: scores per metric, single-layer table, combination table, fitted weightings."""
    unit = "2AFC agreement x100" if table.task == "2afc" else "JND average precision (mAP) x100"
    parts = [header, f"## Scores ({table.task} {table.split}, {unit})\n",
             "Mean of categories weighs each category equally; pooled over triplets weighs each triplet "
             "equally.\n" if table.task == "2afc" else "",
             scores.format_scores_table(analyses.metric_scores)]
    if analyses.sweeps:
        parts += ["\n## Best single tap per category\n",
                  "The best tap is chosen on this split, so its score is optimistic.\n",
                  metric_search.format_single_layer_table(analyses.sweeps)]
        parts += ["\n### Every tap\n"] + [metric_search.format_tap_table(s) + "\n" for s in analyses.sweeps]
    if analyses.search is not None:
        parts += ["\n## Metric combinations\n",
                  f"Metrics searched: {', '.join(analyses.search.metric_names)}.\n",
                  metric_search.format_combination_table(analyses.search)]
    if analyses.fits:
        parts += [f"\n## Fitted channel weightings (scored on {table.split})\n",
                  calibration.format_fit_table(analyses.fits, table.category_names)]
    return "\n".join(p for p in parts if p)


def write_scores_csv(path: str, metric_scores: Mapping[str, scores.CategoryScores]) -> None:
    """Write one row per (metric, category) plus the overall averages: metric,category,score,count."""
    with store.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "category", "score", "count"])
        for name, result in metric_scores.items():
            for category, score, count in zip(result.names, result.scores, result.counts):
                writer.writerow([name, category, f"{score:.6f}", count])
            writer.writerow([name, "mean_of_categories", f"{result.mean_of_categories:.6f}", sum(result.counts)])
            if result.pooled is not None:
                writer.writerow([name, "pooled_over_triplets", f"{result.pooled:.6f}", sum(result.counts)])


def write_distances_csv(path: str, table: SplitTable) -> None:
    """Write every item's distances, one row per (item, metric).

    2AFC columns: split,category,stem,metric,d0,d1,judge. JND columns:
    split,category,stem,metric,d,same (one distance per pair, between p0 and p1).
    """
    is_2afc = table.task == "2afc"
    header = ["split", "category", "stem", "metric"] + (["d0", "d1", "judge"] if is_2afc else ["d", "same"])
    names = np.asarray(table.category_names)[table.category]
    with store.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for metric, sides in table.distances.items():
            columns = [np.char.mod("%.9g", s) for s in sides]
            labels = np.char.mod("%.6g", table.labels)
            for i in range(table.labels.shape[0]):
                writer.writerow([table.split, names[i], table.stems[i], metric, *(c[i] for c in columns), labels[i]])
