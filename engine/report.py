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
    parts += ["", *(notes or [])]
    modes = list(result.modes)
    first = modes[0]

    parts += ["", "## Single representations", ""]
    singles = analyses["modes"][first]["singles"]
    rows = [[s["representations"]] + [s[f"recall_at_{k}"] for k in ks]
            for s in sorted(singles, key=lambda s: -s[f"recall_at_{ks[0]}"])]
    parts.append(_markdown_table(["representation"] + recall_cols, rows))

    for mode in modes:
        mode_out = analyses["modes"][mode]
        parts += ["", f"## Mode: {mode}", "", "### Best subset of each size", ""]
        rows = [[b["size"], b["representations"]] + [b[f"recall_at_{k}"] for k in ks]
                for b in mode_out["best_per_size"]]
        parts.append(_markdown_table(["size", "subset"] + recall_cols, rows))
        parts += ["", f"### Top {len(mode_out['top_subsets'])} subsets", ""]
        rows = [[i + 1, b["representations"]] + [b[f"recall_at_{k}"] for k in ks]
                for i, b in enumerate(mode_out["top_subsets"])]
        parts.append(_markdown_table(["#", "subset"] + recall_cols, rows))
        best = mode_out["best"]
        parts += ["", f"### Ablation of the best subset ({best['representations']}, "
                      f"R@{ks[0]} = {best[f'recall_at_{ks[0]}']})", ""]
        rows = []
        for entry in mode_out["ablation"]:
            if entry["best_without"] is None:
                rows.append([entry["removed"], "(none of this size)", "", ""])
            else:
                other = entry["best_without"]
                rows.append([entry["removed"], other["representations"], other["size"],
                             other[f"recall_at_{ks[0]}"], -entry["drop"]])
        parts.append(_markdown_table(["without", "best subset without it", "size", f"R@{ks[0]}", "change"],
                                     rows))
        part = mode_out["participation"]
        top_q = min(10, part["num_subsets"])
        counts = part["counts"][part["q"].index(top_q)] if top_q in part["q"] else part["counts"][0]
        parts += ["", f"### Participation in the top {top_q} of the {part['num_subsets']} subsets "
                      f"of size {part['size']}", ""]
        parts.append(_markdown_table(part["representations"], [counts]))
        parts += ["", f"Near-tie decisions (within float32 rounding of the true match's score): "
                      f"{mode_out['near_ties']}."]

    if "exclusive" in analyses:
        parts += ["", "## Exclusive retrievals and oracle", ""]
        rows = [[e["representation"], e["count"]] for e in analyses["exclusive"]]
        parts.append(_markdown_table(["representation", f"queries only it recalls at {ks[0] if ks[0] == 1 else 1}"],
                                     rows))
        parts += ["", f"Total exclusive retrievals: {analyses['exclusive_total']}. Oracle (queries recalled "
                      f"at 1 by at least one single representation): {analyses['oracle']}."]
    parts += ["", "## Figures", ""] + [f"![{name}]({name})" for name in FIGURE_NAMES]
    parts += ["", "## Timings (seconds)", ""]
    parts.append(_markdown_table(["stage", "seconds"],
                                 [[stage, f"{seconds:.2f}"] for stage, seconds in result.timings.items()]))
    return "\n".join(parts) + "\n"


def write_figures(result: retrieval.SearchResult, analyses: Mapping[str, Any], out_dir: str) -> list[str]:
    """Write the PNG figures; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.bar([s["representations"] for s in singles], [s[f"recall_at_{k0}"] for s in singles], color="tab:blue")
    ax.set_ylabel(f"recall@{k0} (queries of {result.num_queries})")
    ax.set_title("Single representations")
    ax.tick_params(axis="x", rotation=45)
    save(fig, "single_recall.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in modes:
        best = analyses["modes"][mode]["best_per_size"]
        ax.plot([b["size"] for b in best], [b[f"recall_at_{k0}"] for b in best], marker="o", label=mode)
    ax.set_xlabel("subset size")
    ax.set_ylabel(f"best recall@{k0}")
    ax.set_title("Best subset of each size")
    ax.legend()
    save(fig, "best_by_size.png")

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        part = analyses["modes"][mode]["participation"]
        counts = np.asarray(part["counts"], dtype=np.float64)
        q = np.asarray(part["q"], dtype=np.float64)
        for k, name in enumerate(part["representations"]):
            ax.plot(q, counts[:, k] / q, label=name)
        ax.set_xscale("log")
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
