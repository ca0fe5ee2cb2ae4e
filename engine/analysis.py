"""The analyses researchers publish from a subset search.

All of them read the per-subset recall counts and the per-query capped ranks
kept by `engine.retrieval.search`, so none needs a second pass over the
similarities.

Ordering of subsets. "Best" means the highest recall at the first K; ties
are broken by the higher recall at the next K values, then by the smaller
subset, then by the smaller mask, so every ordering is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine import retrieval, subsets


def subset_order(recall: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Return row indices of `recall` [S, K] from best to worst (see the module docstring)."""
    sizes = subsets.popcount(masks)
    keys = [masks, sizes] + [-recall[:, j] for j in reversed(range(recall.shape[1]))]
    return np.lexsort(keys)


def reported_rows(recall: np.ndarray, masks: np.ndarray, num_members: int, *, top: int) -> np.ndarray:
    """Return the rows of every subset `analyse` reports: the `top` leading subsets, the best of
    each size, and the subsets the ablation of the best one compares with.

    Args:
      recall: int [S, K] recall counts of one mode.
      masks: int64 [S] the searched subsets.
      num_members: M.
      top: number of leading subsets.
    """
    order = subset_order(recall, masks)
    sizes = subsets.popcount(masks)
    rows = set(order[:top].tolist())
    ordered_sizes = sizes[order]
    for size in np.unique(sizes).tolist():
        rows.add(int(order[np.argmax(ordered_sizes == size)]))
    best = int(masks[order[0]])
    best_size = int(sizes[order[0]])
    for member in subsets.mask_members(best, num_members):
        lacks = (masks[order] >> member) & 1 == 0
        for size in (best_size, best_size - 1):
            candidates = np.flatnonzero(lacks & (ordered_sizes == size))
            if candidates.size:
                rows.add(int(order[candidates[0]]))
                break
    return np.array(sorted(rows), dtype=np.int64)


def describe_subset(result: retrieval.SearchResult, mode: str, row: int) -> dict[str, Any]:
    """Return the JSON record of one subset: mask, size, names and recall counts."""
    mask = int(result.masks[row])
    record = {
        "mask": mask,
        "size": int(subsets.popcount(np.array([mask]))[0]),
        "representations": subsets.mask_label(mask, result.names),
    }
    recall = result.modes[mode].recall[row]
    for j, k in enumerate(result.ks):
        record[f"recall_at_{k}"] = int(recall[j])
    return record


def best_per_size(result: retrieval.SearchResult, mode: str) -> list[dict[str, Any]]:
    """Return the best subset of every searched size, smallest size first."""
    recall = result.modes[mode].recall
    sizes = result.sizes()
    best = []
    for size in np.unique(sizes):
        rows = np.flatnonzero(sizes == size)
        winner = rows[subset_order(recall[rows], result.masks[rows])[0]]
        best.append(describe_subset(result, mode, int(winner)))
    return best


def top_subsets(result: retrieval.SearchResult, mode: str, count: int = 20) -> list[dict[str, Any]]:
    order = subset_order(result.modes[mode].recall, result.masks)
    return [describe_subset(result, mode, int(row)) for row in order[:count]]


def ablation(result: retrieval.SearchResult, mode: str, mask: int) -> list[dict[str, Any]]:
    """For each member of `mask`: the best searched subset of the same size without it, and the drop.

    The drop is measured at the first K. When no subset of the same size
    lacks the member (the best subset is all M representations), the best
    subset one smaller without it is used instead, and its `size` field shows it. A
    member with neither (M = 1) gets None.
    """
    recall = result.modes[mode].recall
    sizes = result.sizes()
    size = int(subsets.popcount(np.array([mask]))[0])
    own = int(recall[result.row_of(mask), 0])
    rows = []
    for member in subsets.mask_members(mask, len(result.names)):
        without = np.zeros(0, np.int64)
        for candidate_size in (size, size - 1):
            rows_of_size = np.flatnonzero(sizes == candidate_size)
            without = rows_of_size[(result.masks[rows_of_size] >> member) & 1 == 0]
            if without.size:
                break
        entry: dict[str, Any] = {"removed": result.names[member]}
        if without.size == 0:
            entry.update(best_without=None, drop=None)
        else:
            winner = int(without[subset_order(recall[without], result.masks[without])[0]])
            record = describe_subset(result, mode, winner)
            entry.update(best_without=record, drop=own - record[f"recall_at_{result.ks[0]}"])
        rows.append(entry)
    return rows


def participation(result: retrieval.SearchResult, mode: str, size: int) -> np.ndarray:
    """Return counts [Q, M]: how often each representation is in the top q subsets of `size`.

    Subsets of the given size are sorted best first; row q − 1 counts the
    members of the first q of them (q = 1..Q, Q the number of such subsets).
    """
    rows = np.flatnonzero(result.sizes() == size)
    ordered = result.masks[rows[subset_order(result.modes[mode].recall[rows], result.masks[rows])]]
    members = subsets.member_matrix(ordered, len(result.names)).astype(np.int64)
    return np.cumsum(members, axis=0)


def single_outcomes(result: retrieval.SearchResult, mode: str) -> np.ndarray:
    """Return bool [M, N]: whether each single representation recalls each query at K = 1."""
    mode_result = result.modes[mode]
    return np.stack([mode_result.ranks_of(1 << k) == 0 for k in range(len(result.names))])


def exclusive_retrievals(outcomes: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """Per representation, the queries that it alone recalls at 1, from single outcomes [M, N]."""
    only = outcomes & (outcomes.sum(axis=0) == 1)[None, :]
    return [{"representation": name, "count": int(only[k].sum()), "queries": np.flatnonzero(only[k]).tolist()}
            for k, name in enumerate(names)]


def analyse(result: retrieval.SearchResult, *, top: int = 20, participation_limit: int = 2000
            ) -> dict[str, Any]:
    """Return every analysis of a search as a JSON-serialisable dict.

    Args:
      result: the search result.
      top: number of leading subsets listed per mode.
      participation_limit: participation curves with more rows than this are
        summarised in the dict at logarithmically spaced q (the full curves
        are available from `participation`).
    """
    first_k = f"recall_at_{result.ks[0]}"
    singles_present = all(np.any(result.masks == (1 << k)) for k in range(len(result.names)))
    out: dict[str, Any] = {"modes": {}}
    for mode in result.modes:
        mode_out: dict[str, Any] = {
            "singles": [describe_subset(result, mode, result.row_of(1 << k))
                        for k in range(len(result.names)) if np.any(result.masks == (1 << k))],
            "best_per_size": best_per_size(result, mode),
            "top_subsets": top_subsets(result, mode, top),
            "near_ties": int(result.modes[mode].near_ties.sum()),
            "whole_gallery_pairs": int(result.modes[mode].undecided_pairs),
        }
        best = mode_out["top_subsets"][0]
        mode_out["best"] = best
        mode_out["ablation"] = ablation(result, mode, best["mask"])
        curve = participation(result, mode, best["size"])
        q_values = np.arange(1, curve.shape[0] + 1)
        if curve.shape[0] > participation_limit:
            q_values = np.unique(np.geomspace(1, curve.shape[0], 200).astype(np.int64))
        mode_out["participation"] = {
            "size": best["size"],
            "num_subsets": int(curve.shape[0]),
            "representations": list(result.names),
            "q": q_values.tolist(),
            "counts": curve[q_values - 1].tolist(),
        }
        out["modes"][mode] = mode_out
    if singles_present:
        outcomes = single_outcomes(result, next(iter(result.modes)))
        exclusive = exclusive_retrievals(outcomes, result.names)
        out["exclusive"] = exclusive
        out["exclusive_total"] = int(sum(e["count"] for e in exclusive))
        out["oracle"] = int(outcomes.any(axis=0).sum())
        out["oracle_note"] = f"queries recalled at K = 1 by at least one single representation ({first_k})"
    return out
