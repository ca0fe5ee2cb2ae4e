"""Writing a subset search to disk: subsets.csv, summary.json, report.md and figures.

Every file is written to a temporary name and renamed into place, so a run
that fails part-way leaves no file that looks complete.
"""

from __future__ import annotations

import csv
import io
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

from engine import retrieval, store, subsets

COMPARISON_COLUMNS = ["interval", "vs best", "difference interval", "Holm p", "distinguishable"]
FIGURE_NAMES = ("single_recall.png", "best_by_size.png", "participation.png", "exclusive.png")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "numpy", "torch", "torchvision", "timm", "orbax-checkpoint", "absl-py"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def subsets_csv(result: retrieval.SearchResult) -> str:
    """Return subsets.csv: one row per (mode, subset), then near-ties per subset."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["mode", "size", "mask", "representations"]
                    + [f"recall_at_{k}" for k in result.ks] + ["near_ties"])
    sizes = result.sizes()
    labels = [subsets.mask_label(int(m), result.names) for m in result.masks]
    for mode, mode_result in result.modes.items():
        for row, mask in enumerate(result.masks.tolist()):
            writer.writerow([mode, int(sizes[row]), mask, labels[row]]
                            + [int(v) for v in mode_result.recall[row]] + [int(mode_result.near_ties[row])])
    return buffer.getvalue()


def searched(result: retrieval.SearchResult) -> dict[str, Any]:
    """Return the summary's account of what was searched and which per-query ranks were kept."""
    request = result.request
    listed = request.get("subset_list")
    sizes, counts = np.unique(result.sizes(), return_counts=True)
    return {
        "num_subsets": int(result.masks.size),
        "all_subsets": bool(result.masks.size == (1 << len(result.names)) - 1),
        "max_subset_size": int(result.sizes().max()),
        "max_subset_size_limit": request.get("max_subset_size"),
        "subset_list": None if listed is None else [subsets.mask_label(m, result.names) for m in listed],
        "subsets_per_size": {str(int(size)): int(count) for size, count in zip(sizes, counts)},
        "singles_always_included": True,
        "per_query_ranks": {
            mode: ("all searched subsets" if mode_result.rank_masks is None
                   or np.array_equal(mode_result.rank_masks, result.masks)
                   else [subsets.mask_label(int(m), result.names) for m in mode_result.rank_masks])
            for mode, mode_result in result.modes.items()
        },
    }


def summary(result: retrieval.SearchResult, analyses: Mapping[str, Any], *,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the summary.json document."""
    return {
        "representations": list(result.names),
        "num_queries": result.num_queries,
        "num_gallery": result.num_gallery,
        "ks": list(result.ks),
        "modes": {
            mode: {
                "weights": [float(w) for w in mode_result.weights],
                "near_ties": int(mode_result.near_ties.sum()),
                "whole_gallery_pairs": int(mode_result.undecided_pairs),
            }
            for mode, mode_result in result.modes.items()
        },
        "searched": searched(result),
        "similarity_mean": result.mean.tolist(),
        "similarity_std": result.std.tolist(),
        "candidates_per_member": result.candidates_per_member,
        "execution": {"devices_per_process": result.request.get("devices"),
                      "processes": result.request.get("processes")},
        "analyses": dict(analyses),
        "timings_seconds": dict(result.timings),
        "versions": library_versions(),
        **dict(extra or {}),
    }


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _interval(record: Mapping[str, Any], k: int, key: str = "interval") -> str:
    """Return "[low, high]" of recall@k from a record's bootstrap interval, or "" without one."""
    interval = record.get(key, {}).get(f"recall_at_{k}")
    return "" if interval is None else f"[{interval[0]:.0f}, {interval[1]:.0f}]"


def _versus_best(entry: Mapping[str, Any]) -> list[str]:
    """Return the cells difference, its interval, Holm p-value and verdict of a paired test, or blanks."""
    test = entry.get("versus_best")
    if test is None:
        return ["", "", "", ""]
    interval = test.get("difference_interval")
    return [f"{test['difference']:+d}", "" if interval is None else f"[{interval[0]:+.0f}, {interval[1]:+.0f}]",
            f"{test['p_value_holm']:.3g}", "yes" if test["distinguishable"] else "no"]


def _statistics_notes(analyses: Mapping[str, Any], k: int) -> list[str]:
    settings = analyses.get("statistics")
    if not settings:
        return []
    level = 100 * settings["level"]
    notes = []
    if settings["bootstrap"]:
        notes.append(f"Intervals: {level:g}% percentile bootstrap over queries, "
                     f"{settings['bootstrap']['num_resamples']} resamples, seed {settings['seed']}.")
    notes.append(f"\"vs best\": the paired difference in R@{k} from the best subset of the mode, its paired "
                 f"bootstrap interval, and the exact McNemar p-value on the queries only one of the two recalls, "
                 f"Holm-adjusted within each table; \"distinguishable\" means adjusted p < "
                 f"{settings['paired_test']['alpha']:.3g}.")
    if settings["cross_validation"]:
        notes.append(f"Cross-validation: {settings['cross_validation']['folds']} folds over queries (seed "
                     f"{settings['seed']}); each fold's subset is chosen on the other folds and scored on it.")
    return notes


def _cross_validation_markdown(mode_out: Mapping[str, Any], ks: tuple[int, ...], num_folds: int) -> list[str]:
    cv = mode_out.get("cross_validation")
    if cv is None:
        return []
    k = ks[0]
    header = ["selection", "in-sample best", f"in-sample R@{k}", f"cross-validated R@{k}", "interval",
              "optimism", "chosen most often (folds)"]
    rows = []
    for label, entry in [("overall", cv["overall"])] + [(f"size {e['size']}", e) for e in cv["by_size"]]:
        most = entry["times_chosen"][0]
        rows.append([label, entry["in_sample_best"]["representations"], entry["in_sample_best"][f"recall_at_{k}"],
                     entry["cross_validated"][f"recall_at_{k}"], _interval(entry, k, "cross_validated_interval"),
                     entry["optimism"], f"{most['representations']} ({most['folds']}/{num_folds})"])
    return ["", "### Cross-validated selection", "", _markdown_table(header, rows)]


def _fitted_markdown(fitted: Mapping[str, Any], ks: tuple[int, ...]) -> list[str]:
    k = ks[0]
    parts = ["", "## Fitted weights (cross-validated)", "",
             "Non-negative weights of the standardised similarities, fitted on the training folds by a softmax "
             "surrogate of recall@1 and scored exactly on the held-out fold; every row is scored on the same "
             "queries and folds.", ""]
    rows = []
    for row in fitted["comparison"]:
        test = row.get("fitted_versus_this")
        cells = [row["label"], row[f"recall_at_{k}"], _interval(row, k)]
        if test is None:
            cells += ["", "", ""]
        else:
            interval = test.get("difference_interval")
            cells += [f"{test['difference']:+d}" + ("" if interval is None else
                                                    f" [{interval[0]:+.0f}, {interval[1]:+.0f}]"),
                      f"{test['p_value_holm']:.3g}", "yes" if test["distinguishable"] else "no"]
        rows.append(cells)
    parts.append(_markdown_table(["weighting", f"R@{k}", "interval", "fitted minus this", "Holm p",
                                  "distinguishable"], rows))
    parts += ["", "Mean fitted weights of the standardised similarities (sum 1):", ""]
    parts.append(_markdown_table(fitted["representations"],
                                 [[f"{w:.3f}" for w in fitted["standardized_weights_mean"]]]))
    return parts


def report_markdown(result: retrieval.SearchResult, analyses: Mapping[str, Any], *,
                    title: str = "Subset search", notes: list[str] | None = None) -> str:
    """Return report.md: the tables a paper would show."""
    ks = result.ks
    recall_cols = [f"R@{k}" for k in ks]
    parts = [f"# {title}", ""]
    parts.append(f"N = {result.num_queries} queries, G = {result.num_gallery} gallery items, "
                 f"M = {len(result.names)} representations ({', '.join(result.names)}); "
                 f"{result.masks.size} subsets searched per mode. Recall counts are numbers of "
                 f"queries (of {result.num_queries}).")
    parts += ["", *(notes or []), *_statistics_notes(analyses, ks[0])]
    num_folds = (analyses.get("statistics") or {}).get("cross_validation") or {}
    num_folds = num_folds.get("folds", 0)
    k0 = ks[0]
    with_statistics = "statistics" in analyses

    def statistics_cells(cells: list[Any]) -> list[Any]:
        return cells if with_statistics else []

    modes = list(result.modes)
    first = modes[0]

    parts += ["", "## Single representations", ""]
    singles = analyses["modes"][first]["singles"]
    rows = [[s["representations"]] + [s[f"recall_at_{k}"] for k in ks] + statistics_cells([_interval(s, k0)])
            for s in sorted(singles, key=lambda s: -s[f"recall_at_{ks[0]}"])]
    parts.append(_markdown_table(["representation"] + recall_cols + statistics_cells([f"R@{k0} interval"]), rows))

    for mode in modes:
        mode_out = analyses["modes"][mode]
        parts += ["", f"## Mode: {mode}", "", "### Best subset of each size", ""]
        rows = [[b["size"], b["representations"]] + [b[f"recall_at_{k}"] for k in ks]
                + statistics_cells([_interval(b, k0)] + _versus_best(b)) for b in mode_out["best_per_size"]]
        parts.append(_markdown_table(["size", "subset"] + recall_cols + statistics_cells(COMPARISON_COLUMNS), rows))
        parts += ["", f"### Top {len(mode_out['top_subsets'])} subsets", ""]
        rows = [[i + 1, b["representations"]] + [b[f"recall_at_{k}"] for k in ks]
                + statistics_cells([_interval(b, k0)] + _versus_best(b))
                for i, b in enumerate(mode_out["top_subsets"])]
        parts.append(_markdown_table(["#", "subset"] + recall_cols + statistics_cells(COMPARISON_COLUMNS), rows))
        best = mode_out["best"]
        parts += ["", f"### Ablation of the best subset ({best['representations']}, "
                      f"R@{ks[0]} = {best[f'recall_at_{ks[0]}']})", ""]
        rows = []
        for entry in mode_out["ablation"]:
            if entry["best_without"] is None:
                rows.append([entry["removed"], "(none of this size)", "", "", ""] + statistics_cells(["", "", ""]))
            else:
                other = entry["best_without"]
                rows.append([entry["removed"], other["representations"], other["size"],
                             other[f"recall_at_{ks[0]}"], -entry["drop"]] + statistics_cells(_versus_best(entry)[1:]))
        parts.append(_markdown_table(["without", "best subset without it", "size", f"R@{ks[0]}", "change"]
                                     + statistics_cells(["change interval", "Holm p", "distinguishable"]), rows))
        part = mode_out["participation"]
        top_q = min(10, part["num_subsets"])
        counts = part["counts"][part["q"].index(top_q)] if top_q in part["q"] else part["counts"][0]
        parts += ["", f"### Participation in the top {top_q} of the {part['num_subsets']} subsets "
                      f"of size {part['size']}", ""]
        parts.append(_markdown_table(part["representations"], [counts]))
        parts += _cross_validation_markdown(mode_out, ks, num_folds)
        parts += ["", f"Near-tie decisions (within float32 rounding of the true match's score, at a "
                      f"requested K or at K = 1): {mode_out['near_ties']}."]

    if "exclusive" in analyses:
        parts += ["", "## Exclusive retrievals and oracle", ""]
        rows = [[e["representation"], e["count"]] for e in analyses["exclusive"]]
        parts.append(_markdown_table(["representation", f"queries only it recalls at {ks[0] if ks[0] == 1 else 1}"],
                                     rows))
        parts += ["", f"Total exclusive retrievals: {analyses['exclusive_total']}. Oracle (queries recalled "
                      f"at 1 by at least one single representation): {analyses['oracle']}."]
    if "fitted_weights" in analyses:
        parts += _fitted_markdown(analyses["fitted_weights"], ks)
    parts += ["", "## Figures", ""] + [f"![{name}]({name})" for name in FIGURE_NAMES]
    parts += ["", "## Timings (seconds)", ""]
    parts.append(_markdown_table(["stage", "seconds"],
                                 [[stage, f"{seconds:.2f}"] for stage, seconds in result.timings.items()]))
    return "\n".join(parts) + "\n"


def _error_bars(records: list[Mapping[str, Any]], k: int, key: str = "interval") -> np.ndarray | None:
    """Return [2, len(records)] distances from each value to its interval ends, or None without intervals."""
    if not records or key not in records[0]:
        return None
    value = np.array([r[f"recall_at_{k}"] if key == "interval" else r["cross_validated"][f"recall_at_{k}"]
                      for r in records], np.float64)
    bounds = np.array([r[key][f"recall_at_{k}"] for r in records], np.float64)
    return np.maximum(np.stack([value - bounds[:, 0], bounds[:, 1] - value]), 0.0)


def _has_intervals(analyses: Mapping[str, Any]) -> bool:
    settings = analyses.get("statistics")
    return bool(settings and settings.get("bootstrap"))


def write_figures(result: retrieval.SearchResult, analyses: Mapping[str, Any], out_dir: str) -> list[str]:
    """Write the PNG figures; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    k0 = result.ks[0]
    paths = []
    modes = list(result.modes)
    first = analyses["modes"][modes[0]]

    def save(fig, name):
        path = os.path.join(out_dir, name)
        with store.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        plt.close(fig)
        paths.append(path)

    singles = sorted(first["singles"], key=lambda s: -s[f"recall_at_{k0}"])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(singles) + 2), 3.5))
    ax.bar([s["representations"] for s in singles], [s[f"recall_at_{k0}"] for s in singles], color="tab:blue",
           yerr=_error_bars(singles, k0), capsize=3)
    ax.set_ylabel(f"recall@{k0} (queries of {result.num_queries})")
    ax.set_title("Single representations")
    ax.tick_params(axis="x", rotation=45)
    save(fig, "single_recall.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in modes:
        best = analyses["modes"][mode]["best_per_size"]
        line = ax.errorbar([b["size"] for b in best], [b[f"recall_at_{k0}"] for b in best],
                           yerr=_error_bars(best, k0), marker="o", capsize=3, label=f"{mode}, in-sample")
        cv = analyses["modes"][mode].get("cross_validation")
        if cv is not None:
            by_size = cv["by_size"]
            ax.errorbar([e["size"] + 0.1 for e in by_size], [e["cross_validated"][f"recall_at_{k0}"] for e in by_size],
                        yerr=_error_bars(by_size, k0, "cross_validated_interval"), marker="s", linestyle="--",
                        capsize=3, color=line[0].get_color(), alpha=0.6, label=f"{mode}, cross-validated")
    ax.set_xlabel("subset size")
    ax.set_ylabel(f"best recall@{k0}")
    ax.set_title("Best subset of each size" + (" (bars: bootstrap intervals)" if _has_intervals(analyses) else ""))
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    save(fig, "best_by_size.png")

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        part = analyses["modes"][mode]["participation"]
        counts = np.asarray(part["counts"], dtype=np.float64)
        q = np.asarray(part["q"], dtype=np.float64)
        for k, name in enumerate(part["representations"]):
            ax.plot(q, counts[:, k] / q, label=name)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(f"top q subsets of size {part['size']}")
        ax.set_ylabel("fraction containing the representation")
        ax.set_title(f"Participation ({mode})")
    axes[0][-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    save(fig, "participation.png")

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(result.names) + 2), 3.5))
    exclusive = analyses.get("exclusive", [])
    ax.bar([e["representation"] for e in exclusive], [e["count"] for e in exclusive], color="tab:orange")
    ax.set_ylabel("queries only it recalls at 1")
    ax.set_title(f"Exclusive retrievals (oracle {analyses.get('oracle', 'n/a')})")
    ax.tick_params(axis="x", rotation=45)
    save(fig, "exclusive.png")
    return paths


def write_outputs(result: retrieval.SearchResult, analyses: Mapping[str, Any], out_dir: str, *,
                  extra_summary: Mapping[str, Any] | None = None, title: str = "Subset search",
                  notes: list[str] | None = None, figures: bool = True) -> dict[str, str]:
    """Write every output file of a search into `out_dir`; return their paths by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "subsets": os.path.join(out_dir, "subsets.csv"),
        "summary": os.path.join(out_dir, "summary.json"),
        "report": os.path.join(out_dir, "report.md"),
    }
    store.write_text(paths["subsets"], subsets_csv(result))
    store.write_json(paths["summary"], summary(result, analyses, extra=extra_summary))
    if figures:
        for path in write_figures(result, analyses, out_dir):
            paths[os.path.basename(path)] = path
    store.write_text(paths["report"], report_markdown(result, analyses, title=title, notes=notes))
    return paths
