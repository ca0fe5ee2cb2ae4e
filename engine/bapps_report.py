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

from engine import analysis, bapps_statistics, calibration, lpips, metric_search, scores, store, subsets


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
    selection: dict[str, Any] | None = None
    comparisons: dict[str, Any] | None = None


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
    confidence: float = 0.95,
    cv_folds: int = 0,
    selection_train: SplitTable | None = None,
    leading: int = 10,
) -> Analyses:
    """Run the scores and, for 2AFC, the single-layer sweep, the combination search and the fits.

    Args:
      table: the evaluated split.
      nets: the nets whose profiles `table` contains.
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
      confidence: coverage of every interval; the paired tests use the level
        1 - confidence.
      cv_folds: folds of the cross-validated selection over the triplets of
        `table` when `selection_train` is None; 0 skips it.
      selection_train: a 2AFC split to choose the best combination and the
        best single tap on; the choice is scored on `table`.
      leading: leading combinations per mode compared with the best one.
    """
    analyses = Analyses(metric_scores=score_metrics(table))
    if table.task != "2afc":
        return analyses

    if bootstrap_resamples:
        per_item = np.stack([result.per_item for result in analyses.metric_scores.values()])
        analyses.intervals = scores.bootstrap_two_afc(
            per_item, table.category, table.category_names, num_resamples=bootstrap_resamples, level=confidence,
            seed=seed)

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

    _held_out_selection(table, nets, analyses, names, max_subset_size=max_subset_size, cv_folds=cv_folds,
                        seed=seed, selection_train=selection_train)
    _paired_comparisons(table, analyses, names, num_resamples=bootstrap_resamples, level=confidence, seed=seed,
                        leading=leading)

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


def _search_distances(table: SplitTable, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([table.distances[n][0] for n in names], axis=1),
            np.stack([table.distances[n][1] for n in names], axis=1))


def _held_out_selection(table: SplitTable, nets: Mapping[str, NetInfo], analyses: Analyses, names: Sequence[str],
                        *, max_subset_size: int | None, cv_folds: int, seed: int,
                        selection_train: SplitTable | None) -> None:
    """Choose the best combination and single tap on train (or the other folds) and score them held out."""
    if selection_train is None and not cv_folds:
        return
    num_categories = len(table.category_names)
    selection: dict[str, Any] = {}
    if selection_train is not None:
        selection["method"] = f"chosen on {selection_train.split}, scored on {table.split}"
        selection["train_split"] = selection_train.split
    else:
        selection["method"] = (f"{cv_folds}-fold cross-validation over the triplets of {table.split} "
                               f"(stratified by category, seed {seed})")
    if analyses.search is not None:
        search = analyses.search
        if selection_train is not None:
            train_search = metric_search.search_metric_subsets(
                *_search_distances(selection_train, names), selection_train.labels, selection_train.category,
                len(selection_train.category_names), modes=search.modes, max_subset_size=max_subset_size,
                metric_names=names, category_names=selection_train.category_names)
            groups = bapps_statistics.selection_groups(search.masks)
            selection["combinations"] = {
                mode: bapps_statistics.select_on_train(
                    {c: train_search.column(mode, c) for c in bapps_statistics.CRITERIA},
                    {c: search.column(mode, c) for c in bapps_statistics.CRITERIA},
                    search.masks, names, groups)
                for mode in search.modes}
        else:
            selection["combinations"] = bapps_statistics.cross_validate_subsets(
                *_search_distances(table, names), table.labels, table.category, num_categories, names,
                modes=search.modes, num_folds=cv_folds, seed=seed, max_subset_size=max_subset_size)["modes"]
    taps = {}
    for sweep in analyses.sweeps or []:
        masks = np.left_shift(1, np.arange(len(sweep.taps), dtype=np.int64))
        tap_labels = [f"{i} ({name})" for i, name in enumerate(sweep.tap_names)]
        if selection_train is not None:
            train_sweep = metric_search.single_layer_sweep(
                *selection_train.profiles[sweep.net], selection_train.labels, selection_train.category,
                nets[sweep.net].channels, None, category_names=selection_train.category_names, net=sweep.net,
                tap_names=sweep.tap_names)
            column = {"mean_of_categories": lambda s: s.mean_of_categories, "pooled_over_triplets": lambda s: s.pooled}
            per_criterion = bapps_statistics.select_on_train(
                {c: np.array([column[c](t) for t in train_sweep.taps]) for c in bapps_statistics.CRITERIA},
                {c: np.array([column[c](t) for t in sweep.taps]) for c in bapps_statistics.CRITERIA},
                masks, tap_labels, {"overall": np.arange(len(sweep.taps))})
            taps[sweep.net] = {c: records["overall"] for c, records in per_criterion.items()}
        else:
            taps[sweep.net] = bapps_statistics.cross_validate_taps(
                np.stack([t.per_item for t in sweep.taps]), table.category, num_categories, tap_labels,
                num_folds=cv_folds, seed=seed)
    selection["single_taps"] = taps
    analyses.selection = selection


def _paired_comparisons(table: SplitTable, analyses: Analyses, names: Sequence[str], *, num_resamples: int,
                        level: float, seed: int, leading: int) -> None:
    """Compare every metric with the best metric, and the leading combinations with the best combination."""
    num_categories = len(table.category_names)
    comparisons: dict[str, Any] = {"test": bapps_statistics.SIGN_TEST, "level": level,
                                   "num_resamples": num_resamples, "criterion": "mean_of_categories"}
    metric_names = list(analyses.metric_scores)
    per_item = np.stack([analyses.metric_scores[n].per_item for n in metric_names])
    means = np.array([analyses.metric_scores[n].mean_of_categories for n in metric_names])
    comparisons["metrics"] = bapps_statistics.paired_comparison(
        per_item, metric_names, table.labels, table.category, num_categories, reference=int(np.argmax(means)),
        num_resamples=num_resamples, level=level, seed=seed)
    if analyses.search is not None:
        search = analyses.search
        d0, d1 = _search_distances(table, names)
        comparisons["combinations"] = {}
        for mode in search.modes:
            order = analysis.subset_order(search.column(mode, "mean_of_categories")[:, None], search.masks)
            rows = list(order[:leading])
            ordered_sizes = search.sizes[order]
            for size in np.unique(search.sizes).tolist():
                first = int(order[np.argmax(ordered_sizes == size)])
                if first not in rows:
                    rows.append(first)
            labels = [subsets.mask_label(int(search.masks[r]), search.metric_names) for r in rows]
            per_subset = np.stack([metric_search.subset_triplet_scores(d0, d1, table.labels, int(search.masks[r]),
                                                                       mode=mode) for r in rows])
            comparisons["combinations"][mode] = bapps_statistics.paired_comparison(
                per_subset, labels, table.labels, table.category, num_categories, reference=0,
                num_resamples=num_resamples, level=level, seed=seed)
    analyses.comparisons = comparisons


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
    if analyses.selection is not None:
        summary["held_out_selection"] = analyses.selection
    if analyses.comparisons is not None:
        summary["paired_comparisons"] = analyses.comparisons
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
    parts += _statistics_sections(table, analyses)
    if analyses.fits:
        parts += [f"\n## Fitted channel weightings (scored on {table.split})\n",
                  calibration.format_fit_table(analyses.fits, table.category_names)]
    return "\n".join(p for p in parts if p)


def _statistics_sections(table: SplitTable, analyses: Analyses) -> list[str]:
    labels = {"mean_of_categories": "mean of categories", "pooled_over_triplets": "pooled over triplets"}
    parts = []
    selection = analyses.selection
    if selection is not None:
        held_out_label = "cross-validated" if "train_split" not in selection else f"held out ({table.split})"
        parts += ["\n## Held-out selection\n",
                  f"Method: {selection['method']}. The in-sample best is chosen and scored on {table.split}; "
                  f"the {held_out_label} score is that of a choice made without the triplets it scores. "
                  "Optimism = in-sample best − held-out score.\n"]
        for mode, per_criterion in (selection.get("combinations") or {}).items():
            for criterion, records in per_criterion.items():
                parts += [f"\n### Combinations, {mode}, chosen by {labels[criterion]}\n",
                          bapps_statistics.format_selection_table(records, held_out_label=held_out_label)]
        for net, per_criterion in selection["single_taps"].items():
            parts += [f"\n### Best single tap of {net}\n",
                      bapps_statistics.format_selection_table(
                          {labels[c]: r for c, r in per_criterion.items()}, held_out_label=held_out_label)]
    comparisons = analyses.comparisons
    if comparisons is not None:
        parts += ["\n## Paired comparisons\n",
                  f"Mean of categories x100 on the same triplets. Intervals: {comparisons['level']:.0%} "
                  f"percentile bootstrap, {comparisons['num_resamples']} resamples of triplets within categories "
                  f"(n/a when off). Test: {comparisons['test']}. Distinguishable: Holm-adjusted p < "
                  f"{1 - comparisons['level']:.3g}.\n",
                  "\n### Every metric against the best metric\n",
                  bapps_statistics.format_comparison_table(comparisons["metrics"])]
        for mode, records in (comparisons.get("combinations") or {}).items():
            parts += [f"\n### Leading {mode} combinations and the best of each size against the best\n",
                      bapps_statistics.format_comparison_table(records)]
    return parts


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
