"""Float64 brute-force reference for the subset search.

Materialises every [N, G] similarity matrix in float64 and scores one subset
at a time, exactly as the semantics are written. Small problems only: the
tests compare the optimised engine against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine import subsets


def cosine_matrices(left: Sequence[np.ndarray], right: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Return float64 cosine similarity matrices [N, G], one per representation."""
    matrices = []
    for a, b in zip(left, right):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        matrices.append(a @ b.T)
    return matrices


def population_std(matrices: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([np.asarray(m, np.float64).std() for m in matrices])


def subset_ranks(matrices: Sequence[np.ndarray], masks: np.ndarray, *, weights: np.ndarray | None = None,
                 standardize: bool = False) -> np.ndarray:
    """Return the uncapped rank [S, N] of every query under every subset.

    Args:
      matrices: M float64 similarity matrices [N, G].
      masks: int [S] subset bitmasks.
      weights: [M] non-negative weights (default 1).
      standardize: use (Φ_k − mean_k) / std_k in place of Φ_k (population moments).
    """
    matrices = [np.asarray(m, np.float64) for m in matrices]
    num_members = len(matrices)
    n = matrices[0].shape[0]
    if standardize:
        # A constant matrix has no standardised values; like the engine, it contributes 0.
        matrices = [(m - m.mean()) / m.std() if m.std() > 0 else np.zeros_like(m) for m in matrices]
    weights = np.ones(num_members) if weights is None else np.asarray(weights, np.float64)
    ranks = np.empty((len(masks), n), np.int64)
    rows = np.arange(n)
    for s, mask in enumerate(np.asarray(masks).tolist()):
        score = sum(weights[k] * matrices[k] for k in subsets.mask_members(mask, num_members))
        true_score = score[rows, rows]
        # The match itself satisfies score >= true_score; subtract it.
        ranks[s] = (score >= true_score[:, None]).sum(axis=1) - 1
    return ranks


def reference_search(left: Sequence[np.ndarray], right: Sequence[np.ndarray], masks: np.ndarray,
                     ks: Sequence[int], modes: Mapping[str, np.ndarray | None]
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {mode: (recall [S, K], ranks [S, N])} by brute force.

    `modes` maps a mode name to its weights; the names "raw" (weights None)
    and "standardized" (weights None) use the built-in definitions.
    """
    matrices = cosine_matrices(left, right)
    out = {}
    for mode, weights in modes.items():
        ranks = subset_ranks(matrices, masks, weights=weights, standardize=(mode == "standardized" and weights is None))
        recall = np.stack([(ranks < k).sum(axis=1) for k in ks], axis=1)
        out[mode] = (recall, ranks)
    return out
