"""2AFC of every subset of M distance metrics, summed raw or standardised.

Shapes: T triplets, M metrics, S subsets, K categories.

A subset S combines metrics by summing their distances, d_S = sum_k w_k d_k,
with w_k = 1 (raw) or w_k = 1 / sigma_k (standardised, sigma_k the population
standard deviation of metric k over all 2T values of d0 and d1; a mean shift
would cancel in d0 - d1). Bit k of a subset mask is metric k.

Exactness. Only the sign of d0_S - d1_S = sum_k w_k (d0_k - d1_k) matters, and
a tie (zero) scores 0.5, so the engine scores in fixed point: each metric's
weighted margin is rounded to an int32 multiple of 2^-e, with e the largest
exponent for which no subset sum can overflow. Integer sums are exact in any
order, so every device and chunking gives the same decisions. They equal the
float64 reference, which sums members in ascending order, except where
|sum| <= |S| units: there the rounding of up to |S| margins by half a unit
each could flip the sign. Those (subset, triplet) pairs are counted as
near-ties. The per-category means do not depend on order either. Each
h - 0.5 is rounded to 42 fractional bits (an error below 2^-43 per triplet)
and split into limbs of at most 8 bits. The float32 matmul that aggregates
the decisions therefore only adds integers below 2^24, which is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from absl import logging
from tqdm import tqdm

from engine import distributed
from engine import lpips as lpips_lib
from engine import scores as scores_lib
from engine import subsets

__all__ = [
    "MODES",
    "SingleLayerSweep",
    "SubsetSearchResult",
    "format_combination_table",
    "format_single_layer_table",
    "format_tap_table",
    "fold_category_totals",
    "metric_weights",
    "prepare_margins",
    "search_metric_subsets",
    "search_metric_subsets_reference",
    "single_layer_sweep",
    "subset_decisions",
    "subset_triplet_scores",
]

MODES = ("raw", "standardized")
JUDGE_BITS = 42  # fixed-point bits of h - 0.5; the rounding error per triplet is 2^-43
FLOAT32_EXACT_INTEGER = 1 << 24
MAX_LIMB_BITS = 8  # limbs <= 255 are exact even where a matmul rounds inputs to bfloat16
INT32_MAX = (1 << 31) - 1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}.")


def _check_distances(d0: Any, d1: Any) -> tuple[np.ndarray, np.ndarray]:
    d0 = np.asarray(d0, dtype=np.float64)
    d1 = np.asarray(d1, dtype=np.float64)
    if d0.ndim != 2 or d0.shape != d1.shape:
        raise ValueError(f"d0 and d1 must both be [T, M] with the same shape, got {d0.shape} and {d1.shape}.")
    if d0.shape[0] == 0 or d0.shape[1] == 0:
        raise ValueError(f"d0 must have at least one triplet and one metric, got shape {d0.shape}.")
    for name, array in (("d0", d0), ("d1", d1)):
        if not np.all(np.isfinite(array)):
            t, k = np.argwhere(~np.isfinite(array))[0]
            raise ValueError(f"{name}[{t}, {k}] is {array[t, k]}; every distance must be finite.")
    return d0, d1


def metric_weights(d0: Any, d1: Any, mode: str) -> np.ndarray:
    """Return the float64 `[M]` factor each metric's distances are multiplied by in `mode`.

    Args:
      d0: `[T, M]` distances between the reference and p0.
      d1: `[T, M]` distances between the reference and p1.
      mode: "raw" (all ones) or "standardized" (1 / population std over the
        2T values of d0 and d1 of each metric).
    """
    _check_mode(mode)
    d0, d1 = _check_distances(d0, d1)
    if mode == "raw":
        return np.ones(d0.shape[1])

    std = np.concatenate([d0, d1], axis=0).std(axis=0)
    constant = np.flatnonzero(std == 0.0)
    if constant.size:
        raise ValueError(f"metrics {constant.tolist()} are constant over d0 and d1, so they cannot be "
                         "standardised; drop them (a constant distance ties every triplet).")
    return 1.0 / std


@dataclasses.dataclass(frozen=True)
class Margins:
    """Per-metric margins w_k (d0_k - d1_k) of one mode in fixed point.

    Attributes:
      quantized: int32 `[T, M]`, the margin times 2^exponent, rounded.
      exponent: the fixed-point exponent e.
      weights: float64 `[M]`, the factor of each metric in this mode.
    """

    quantized: np.ndarray
    exponent: int
    weights: np.ndarray


def prepare_margins(d0: Any, d1: Any, mode: str) -> Margins:
    """Quantise the weighted margins of `mode` so that no subset sum overflows int32.

    Args:
      d0: `[T, M]` distances between the reference and p0.
      d1: `[T, M]` distances between the reference and p1.
      mode: "raw" or "standardized".
    """
    d0, d1 = _check_distances(d0, d1)
    weights = metric_weights(d0, d1, mode)
    margins = (d0 - d1) * weights
    num_metrics = d0.shape[1]

    # Rounding adds at most 1/2 per member, so the bound keeps M units spare.
    largest_sum = np.abs(margins).sum(axis=1).max()
    if largest_sum == 0.0:
        exponent = 0
    else:
        exponent = int(np.floor(np.log2((INT32_MAX - num_metrics) / largest_sum)))
    quantized = np.rint(np.ldexp(margins, exponent)).astype(np.int32)
    return Margins(quantized=quantized, exponent=exponent, weights=weights)


def subset_decisions(margins: Margins, mask: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the engine's decision per triplet for one subset, computed on the host.

    Args:
      margins: the output of `prepare_margins` for one mode.
      mask: the subset bitmask (bit k = metric k).

    Returns:
      sign: int64 `[T]`, +1 where d1_S < d0_S (prefers p1), -1 where d0_S < d1_S,
        0 on a tie, exactly as the batched kernel decides.
      near_tie: bool `[T]`, where the float64 reference could decide otherwise.
    """
    members = subsets.mask_members(mask, margins.quantized.shape[1])
    if not members:
        raise ValueError(f"mask {mask} selects no metric of {margins.quantized.shape[1]}.")
    total = margins.quantized[:, members].astype(np.int64).sum(axis=1)
    return np.sign(total), np.abs(total) <= len(members)


def subset_triplet_scores(d0: Any, d1: Any, judge: Any, mask: int, *, mode: str) -> np.ndarray:
    """Return the float64 `[T]` per-triplet 2AFC scores of one subset, for bootstrap intervals.

    The decisions are the engine's (fixed point), so their mean equals the
    search result's score for this subset.
    """
    judge = np.asarray(judge, dtype=np.float64)
    sign, _ = subset_decisions(prepare_margins(d0, d1, mode), mask)
    return 0.5 + sign * (judge - 0.5)


def _judge_limbs(judge: np.ndarray, category: np.ndarray, num_categories: int) -> tuple[np.ndarray, int]:
    """Split h - 0.5 into signed limbs, one column per (limb, category): float32 `[T, J * K]`."""
    largest_category = int(np.bincount(category, minlength=num_categories).max())
    limb_bits = min(MAX_LIMB_BITS, int(np.floor(np.log2(FLOAT32_EXACT_INTEGER / largest_category))))
    if limb_bits < 1:
        raise ValueError(f"a category has {largest_category} triplets; at most {FLOAT32_EXACT_INTEGER // 2} "
                         "fit the exact aggregation, so split it into smaller categories.")
    num_limbs = -(-(JUDGE_BITS + 1) // limb_bits)

    fixed = np.rint(np.ldexp(judge - 0.5, JUDGE_BITS)).astype(np.int64)
    magnitude = np.abs(fixed)
    limb_mask = (1 << limb_bits) - 1
    matrix = np.zeros((judge.shape[0], num_limbs * num_categories), dtype=np.float32)
    rows = np.arange(judge.shape[0])
    for j in range(num_limbs):
        limb = np.sign(fixed) * ((magnitude >> (j * limb_bits)) & limb_mask)
        matrix[rows, j * num_categories + category] = limb
    return matrix, limb_bits


def _score_chunk(members: jax.Array, sizes: jax.Array, quantized: jax.Array,
                 limb_matrix: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decide and aggregate one chunk of subsets.

    Args:
      members: bool `[S, M]` membership of each subset (all False for padding).
      sizes: int32 `[S]` members per subset.
      quantized: int32 `[M, T]` fixed-point margins.
      limb_matrix: float32 `[T, J * K]` limbs of h - 0.5 per category.

    Returns:
      net: int32 `[S, J * K]`, per limb and category the sum of sign * limb.
      near_ties: int32 `[S]` triplets with |sum| <= size.
      ties: int32 `[S]` triplets with sum == 0.
    """
    total = jnp.zeros((members.shape[0], quantized.shape[1]), dtype=jnp.int32)
    for k in range(quantized.shape[0]):
        total = total + jnp.where(members[:, k:k + 1], quantized[k][None, :], 0)

    sign = jnp.sign(total).astype(jnp.float32)
    net = jnp.dot(sign, limb_matrix, precision=jax.lax.Precision.HIGHEST)
    near_ties = jnp.sum(jnp.abs(total) <= sizes[:, None], axis=1, dtype=jnp.int32)
    ties = jnp.sum(total == 0, axis=1, dtype=jnp.int32)
    return net.astype(jnp.int32), near_ties, ties


def _score_masks(quantized: np.ndarray, masks: np.ndarray, limb_matrix: np.ndarray, chunk: int,
                 topology: distributed.Topology, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run `_score_chunk` over every mask, one chunk of `chunk` subsets per local device and step.

    Every device runs the same program on a chunk of the same shape, whatever
    the device count, and every output is an integer, so the results are the
    same bit for bit on any number of devices.

    Args:
      quantized: int32 `[T, M]` fixed-point margins of one mode.
      masks: int64 `[S]` subset masks.
      limb_matrix: float32 `[T, J * K]` limbs of h - 0.5 per column.
      chunk: subsets per device and step.
      topology: the local devices.
      desc: progress-bar label.

    Returns:
      int64 `[S, J * K]` limb sums, int64 `[S]` near ties, int64 `[S]` ties.
    """
    num_masks, num_metrics = masks.shape[0], quantized.shape[1]
    num_chunks = -(-num_masks // chunk)
    topology = topology.leading(num_chunks)
    step = chunk * topology.num_shards
    spec = distributed.AXIS
    kernel = topology.per_device(_score_chunk, in_specs=(P(spec), P(spec), P(), P()),
                                 out_specs=(P(spec), P(spec), P(spec)), key=("metric_search._score_chunk",))
    quantized_device = topology.shard(np.ascontiguousarray(quantized.T))
    limbs_device = topology.shard(limb_matrix)
    net = np.zeros((num_masks, limb_matrix.shape[1]), dtype=np.int64)
    near_ties = np.zeros(num_masks, dtype=np.int64)
    ties = np.zeros(num_masks, dtype=np.int64)
    starts = range(0, num_masks, step)
    for start in tqdm(starts, desc=desc, disable=len(starts) < 8):
        stop = min(start + step, num_masks)
        padded = np.zeros(step, dtype=np.int64)
        padded[:stop - start] = masks[start:stop]
        members = subsets.member_matrix(padded, num_metrics).astype(bool)
        outputs = kernel(topology.shard(members, spec),
                         topology.shard(subsets.popcount(padded).astype(np.int32), spec),
                         quantized_device, limbs_device)
        chunk_net, chunk_near, chunk_ties = (np.asarray(jax.device_get(o))[:stop - start] for o in outputs)
        net[start:stop] = chunk_net
        near_ties[start:stop] = chunk_near
        ties[start:stop] = chunk_ties
    return net, near_ties, ties


def _column_net(quantized: np.ndarray, masks: np.ndarray, judge: np.ndarray, column: np.ndarray,
                num_columns: int, chunk: int, topology: distributed.Topology, desc: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return float64 `[S, K]` sums of sign * (h - 0.5) per column (exact to 2^-42), near ties and ties."""
    limb_matrix, limb_bits = _judge_limbs(judge, column, num_columns)
    num_limbs = limb_matrix.shape[1] // num_columns
    net, near_ties, ties = _score_masks(quantized, masks, limb_matrix, chunk, topology, desc)
    # Recombine the limbs into one int64 per column: sum_t sign_t * round((h_t - 0.5) 2^42).
    limb_sums = net.reshape(masks.shape[0], num_limbs, num_columns)
    fixed = sum(limb_sums[:, j, :] << (j * limb_bits) for j in range(num_limbs))
    return np.ldexp(fixed.astype(np.float64), -JUDGE_BITS), near_ties, ties


@dataclasses.dataclass(frozen=True)
class BestSubset:
    """Highest-scoring subset of one column; ties go to fewer members, then to the lower mask."""

    mask: int
    members: tuple[str, ...]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"mask": self.mask, "members": list(self.members), "score": self.score}


@dataclasses.dataclass(frozen=True)
class SubsetSearchResult:
    """2AFC (x100) of every searched subset, per mode and category.

    Attributes:
      metric_names: `[M]` metric names; bit k of a mask is metric k.
      category_names: `[K]` category names.
      category_counts: triplets per category.
      masks: int64 `[S]` searched masks, ascending.
      sizes: int64 `[S]` members per mask.
      modes: the searched modes.
      category_scores: mode -> float64 `[S, K]` score x100.
      mean_of_categories: mode -> float64 `[S]` unweighted mean of the categories.
      pooled: mode -> float64 `[S]` score over all triplets together.
      near_ties: mode -> int64 `[S]` triplets where the float64 reference
        could decide otherwise (|fixed-point margin| <= subset size).
      ties: mode -> int64 `[S]` triplets scored as exact ties (0.5).
      weights: mode -> float64 `[M]` factor of each metric.
      exponents: mode -> fixed-point exponent of the margins.
    """

    metric_names: tuple[str, ...]
    category_names: tuple[str, ...]
    category_counts: tuple[int, ...]
    masks: np.ndarray
    sizes: np.ndarray
    modes: tuple[str, ...]
    category_scores: dict[str, np.ndarray]
    mean_of_categories: dict[str, np.ndarray]
    pooled: dict[str, np.ndarray]
    near_ties: dict[str, np.ndarray]
    ties: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    exponents: dict[str, int]

    def column(self, mode: str, column: str) -> np.ndarray:
        """Return float64 `[S]` scores of a category, "mean_of_categories" or "pooled_over_triplets"."""
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} was not searched; searched modes: {list(self.modes)}.")
        if column == "mean_of_categories":
            return self.mean_of_categories[mode]
        if column == "pooled_over_triplets":
            return self.pooled[mode]
        if column in self.category_names:
            return self.category_scores[mode][:, self.category_names.index(column)]
        raise ValueError(f"unknown column {column!r}; valid columns: "
                         f"{[*self.category_names, 'mean_of_categories', 'pooled_over_triplets']}.")

    def best(self, mode: str, column: str, *, min_size: int = 1, max_size: int | None = None) -> BestSubset | None:
        """Return the best subset with min_size..max_size members, or None if there is none."""
        values = self.column(mode, column)
        keep = self.sizes >= min_size
        if max_size is not None:
            keep &= self.sizes <= max_size
        if not keep.any():
            return None

        candidates = np.flatnonzero(keep)
        top = values[candidates].max()
        winners = candidates[values[candidates] == top]
        winner = winners[np.lexsort((self.masks[winners], self.sizes[winners]))[0]]
        mask = int(self.masks[winner])
        return BestSubset(mask=mask, score=float(top),
                          members=tuple(self.metric_names[k] for k in subsets.mask_members(mask, len(self.metric_names))))

    def score_of(self, mode: str, column: str, mask: int) -> float:
        """Return the score x100 of subset `mask` in a column.

        Use it to evaluate a subset picked on another split; masks of two
        results name the same metrics only when their `metric_names` match.
        """
        row = int(np.searchsorted(self.masks, mask))
        if row >= self.masks.shape[0] or self.masks[row] != mask:
            raise ValueError(f"mask {mask} was not searched; masks run over {self.masks.shape[0]} subsets "
                             f"of {len(self.metric_names)} metrics (max_subset_size may exclude it).")
        return float(self.column(mode, column)[row])

    def columns(self) -> list[str]:
        return [*self.category_names, "mean_of_categories", "pooled_over_triplets"]

    def to_dict(self, *, include_subsets: bool = False) -> dict[str, Any]:
        """Return a JSON-serialisable summary: best single metric and best combination per column and mode.

        Args:
          include_subsets: also list every subset's scores (2^M rows per mode).
        """
        summary: dict[str, Any] = {
            "metrics": list(self.metric_names),
            "categories": dict(zip(self.category_names, self.category_counts)),
            "num_subsets": int(self.masks.shape[0]),
            "modes": {},
        }
        for mode in self.modes:
            entry: dict[str, Any] = {
                "weights": self.weights[mode].tolist(),
                "fixed_point_exponent": self.exponents[mode],
                "near_ties_total": int(self.near_ties[mode].sum()),
                "ties_total": int(self.ties[mode].sum()),
                "best": {},
            }
            for column in self.columns():
                single = self.best(mode, column, max_size=1)
                combination = self.best(mode, column, min_size=2)
                entry["best"][column] = {
                    "single": single.to_dict(),
                    "combination": combination.to_dict() if combination else None,
                    "gain": combination.score - single.score if combination else None,
                }
            if include_subsets:
                entry["subsets"] = [
                    {"mask": int(mask), "size": int(size),
                     "metrics": subsets.mask_label(int(mask), self.metric_names),
                     "scores": dict(zip(self.category_names, row.tolist())),
                     "mean_of_categories": float(mean), "pooled_over_triplets": float(pooled),
                     "near_ties": int(near)}
                    for mask, size, row, mean, pooled, near in zip(
                        self.masks, self.sizes, self.category_scores[mode], self.mean_of_categories[mode],
                        self.pooled[mode], self.near_ties[mode])]
            summary["modes"][mode] = entry
        return summary


def _check_labels(judge: Any, category: Any, num_triplets: int, num_categories: int) -> tuple[np.ndarray, np.ndarray]:
    judge = np.asarray(judge, dtype=np.float64)
    category = np.asarray(category)
    if judge.shape != (num_triplets,) or category.shape != (num_triplets,):
        raise ValueError(f"judge and category must be [T] with T = {num_triplets}, "
                         f"got {judge.shape} and {category.shape}.")
    if not np.all((judge >= 0.0) & (judge <= 1.0)):
        raise ValueError("judge must be a fraction of people in [0, 1]; "
                         f"got values in [{judge.min()}, {judge.max()}].")
    if category.dtype.kind not in "iu" or category.min() < 0 or category.max() >= num_categories:
        raise ValueError(f"category must hold int codes in [0, {num_categories - 1}], "
                         f"got dtype {category.dtype} with values {np.unique(category)[:10]}.")
    counts = np.bincount(category, minlength=num_categories)
    if np.any(counts == 0):
        raise ValueError(f"categories {np.flatnonzero(counts == 0).tolist()} have no triplets; "
                         "pass only categories present in the data.")
    return judge, category.astype(np.int64)


def _default_names(names: Sequence[str] | None, count: int, prefix: str, what: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(count))
    if len(names) != count:
        raise ValueError(f"{what} has {len(names)} names for {count} columns; pass one name each.")
    return tuple(names)


def _chunk_size(num_triplets: int, memory_budget_bytes: int) -> int:
    # The kernel materialises about three [S, T] arrays of 4 bytes.
    return int(np.clip(memory_budget_bytes // (12 * num_triplets), 1, 1 << 16))


def search_metric_subsets(d0: Any, d1: Any, judge: Any, category: Any, num_categories: int, *,
                          modes: Sequence[str] = MODES, max_subset_size: int | None = None,
                          metric_names: Sequence[str] | None = None,
                          category_names: Sequence[str] | None = None,
                          chunk_size: int | None = None,
                          memory_budget_bytes: int = 256 << 20,
                          topology: distributed.Topology | None = None) -> SubsetSearchResult:
    """Score every subset of the M metrics on 2AFC, per category, in each mode.

    Chunks of subsets run through one jitted kernel (fixed chunk shape, the
    last chunk padded with empty masks), so the kernel compiles once. Each
    step gives one chunk to each local device; the results are identical, bit
    for bit, for any number of devices.

    Args:
      d0: `[T, M]` distances between the reference and p0, one column per metric.
      d1: `[T, M]` distances between the reference and p1.
      judge: `[T]` fraction of people who chose p1.
      category: int `[T]` category codes in [0, num_categories).
      num_categories: K.
      modes: any of "raw" and "standardized".
      max_subset_size: search only subsets with at most this many members.
      metric_names: `[M]` names for the report (default m0, m1, ...).
      category_names: `[K]` names for the report (default c0, c1, ...).
      chunk_size: subsets per kernel call; by default sized to `memory_budget_bytes`.
      memory_budget_bytes: memory of the per-chunk `[S, T]` intermediates.
      topology: the devices to shard the subset chunks over; default every
        local device (`engine.distributed.local()`).

    Returns:
      `SubsetSearchResult` with every subset's scores. Its `best` method picks
      the best single metric and the best combination per category, the
      layout of Table 3 in Rosenfeld et al., "High-Level Perceptual
      Similarity is Enabled by Learning Diverse Tasks" (2019).
    """
    d0, d1 = _check_distances(d0, d1)
    num_triplets, num_metrics = d0.shape
    judge, category = _check_labels(judge, category, num_triplets, num_categories)
    for mode in modes:
        _check_mode(mode)
    metric_names = _default_names(metric_names, num_metrics, "m", "metric_names")
    category_names = _default_names(category_names, num_categories, "c", "category_names")

    masks = subsets.all_masks(num_metrics, max_size=max_subset_size)
    sizes = subsets.popcount(masks)
    counts = np.bincount(category, minlength=num_categories)
    chunk = chunk_size or _chunk_size(num_triplets, memory_budget_bytes)
    chunk = min(chunk, masks.shape[0])
    topology = topology or distributed.local()

    result_fields: dict[str, dict[str, Any]] = {name: {} for name in (
        "category_scores", "mean_of_categories", "pooled", "near_ties", "ties", "weights", "exponents")}
    for mode in modes:
        margins = prepare_margins(d0, d1, mode)
        category_net, near_ties, ties = _column_net(margins.quantized, masks, judge, category, num_categories,
                                                    chunk, topology, f"subsets ({mode})")
        category_scores = 100.0 * (0.5 + category_net / counts)

        result_fields["category_scores"][mode] = category_scores
        result_fields["mean_of_categories"][mode] = category_scores.mean(axis=1)
        result_fields["pooled"][mode] = 100.0 * (0.5 + category_net.sum(axis=1) / num_triplets)
        result_fields["near_ties"][mode] = near_ties
        result_fields["ties"][mode] = ties
        result_fields["weights"][mode] = margins.weights
        result_fields["exponents"][mode] = margins.exponent
        logging.info("Scored %d subsets of %d metrics in %s mode; %d near-tie (subset, triplet) pairs.",
                     masks.shape[0], num_metrics, mode, int(near_ties.sum()))

    return SubsetSearchResult(
        metric_names=metric_names, category_names=category_names,
        category_counts=tuple(int(c) for c in counts), masks=masks, sizes=sizes, modes=tuple(modes),
        **result_fields)


def fold_category_totals(d0: Any, d1: Any, judge: Any, category: Any, num_categories: int, folds: Any,
                         num_folds: int, *, mode: str, max_subset_size: int | None = None,
                         chunk_size: int | None = None, memory_budget_bytes: int = 256 << 20,
                         topology: distributed.Topology | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum every subset's per-triplet 2AFC scores over the triplets of each (fold, category) cell.

    One search over the columns fold * K + category, so cross-validation
    costs one pass over the subsets. A cell may be empty. The decisions are
    the engine's (the same fixed point and standardisation weights as
    `search_metric_subsets` on all triplets), so summing a row over folds
    gives that search's score times the category counts.

    Args:
      d0, d1: `[T, M]` distances.
      judge: `[T]` fraction of people who chose p1.
      category: int `[T]` category codes in [0, num_categories).
      num_categories: K.
      folds: int `[T]` fold of each triplet in [0, num_folds).
      num_folds: F.
      mode: "raw" or "standardized".
      max_subset_size, chunk_size, memory_budget_bytes, topology: as in
        `search_metric_subsets`.

    Returns:
      masks int64 `[S]`, totals float64 `[S, F, K]` (sums of per-triplet
      scores in [0, 1]), counts int64 `[F, K]` triplets per cell.
    """
    d0, d1 = _check_distances(d0, d1)
    num_triplets, num_metrics = d0.shape
    judge, category = _check_labels(judge, category, num_triplets, num_categories)
    folds = np.asarray(folds)
    if folds.shape != (num_triplets,) or folds.dtype.kind not in "iu" or folds.min() < 0 or folds.max() >= num_folds:
        raise ValueError(f"folds must be int [T] = [{num_triplets}] with values in [0, {num_folds}); "
                         f"got shape {folds.shape}, dtype {folds.dtype}.")
    _check_mode(mode)
    column = folds.astype(np.int64) * num_categories + category
    num_columns = num_folds * num_categories
    masks = subsets.all_masks(num_metrics, max_size=max_subset_size)
    chunk = min(chunk_size or _chunk_size(num_triplets, memory_budget_bytes), masks.shape[0])
    net, _, _ = _column_net(prepare_margins(d0, d1, mode).quantized, masks, judge, column, num_columns, chunk,
                            topology or distributed.local(), f"fold subsets ({mode})")
    counts = np.bincount(column, minlength=num_columns).astype(np.int64)
    totals = 0.5 * counts + net
    return masks, totals.reshape(-1, num_folds, num_categories), counts.reshape(num_folds, num_categories)


def search_metric_subsets_reference(d0: Any, d1: Any, judge: Any, category: Any, num_categories: int, *,
                                    modes: Sequence[str] = MODES,
                                    max_subset_size: int | None = None) -> dict[str, np.ndarray]:
    """Score every subset in float64 one at a time; the brute-force reference for tests.

    Each combined distance sums its members in ascending metric order.

    Returns:
      mode -> float64 `[S, K]` score x100, rows in `subsets.all_masks` order.
    """
    d0, d1 = _check_distances(d0, d1)
    judge, category = _check_labels(judge, category, d0.shape[0], num_categories)
    masks = subsets.all_masks(d0.shape[1], max_size=max_subset_size)
    out = {}
    for mode in modes:
        weights = metric_weights(d0, d1, mode)
        table = np.zeros((masks.shape[0], num_categories))
        for row, mask in enumerate(masks):
            combined0 = np.zeros(d0.shape[0])
            combined1 = np.zeros(d0.shape[0])
            for k in subsets.mask_members(int(mask), d0.shape[1]):
                combined0 = combined0 + weights[k] * d0[:, k]
                combined1 = combined1 + weights[k] * d1[:, k]
            per_triplet = scores_lib.two_afc_scores(combined0, combined1, judge)
            for c in range(num_categories):
                table[row, c] = 100.0 * per_triplet[category == c].mean()
        out[mode] = table
    return out


@dataclasses.dataclass(frozen=True)
class SingleLayerSweep:
    """2AFC (x100) of each single tap of one network against its all-layer distances.

    Attributes:
      net: network name.
      tap_names: `[L]` tap labels, in tap order (index 0 shallowest).
      taps: `[L]` per-tap `CategoryScores` of the uncalibrated single-tap
        distance (weight 1 on the tap's channels, 0 elsewhere).
      all_layers: `CategoryScores` of the uncalibrated sum over all taps.
      calibrated: `CategoryScores` of the calibrated all-layer distance, or None.
    """

    net: str
    tap_names: tuple[str, ...]
    taps: tuple[scores_lib.CategoryScores, ...]
    all_layers: scores_lib.CategoryScores
    calibrated: scores_lib.CategoryScores | None

    @property
    def category_names(self) -> tuple[str, ...]:
        return self.all_layers.names

    def tap_table(self) -> np.ndarray:
        """Return float64 `[L, K]` per-tap category scores x100."""
        return np.asarray([tap.scores for tap in self.taps])

    def best_tap(self, category: str) -> tuple[int, float]:
        """Return (tap index, score) of the best single tap for `category`; ties go to the shallower tap."""
        column = self.tap_table()[:, self.category_names.index(category)]
        best = int(np.argmax(column))
        return best, float(column[best])

    def to_dict(self) -> dict[str, Any]:
        per_category = {}
        for name in self.category_names:
            tap, score = self.best_tap(name)
            calibrated = self.calibrated.score(name) if self.calibrated else None
            per_category[name] = {
                "tap_scores": [t.score(name) for t in self.taps],
                "best_tap": tap,
                "best_tap_name": self.tap_names[tap],
                "best_tap_score": score,
                "all_layers_uncalibrated": self.all_layers.score(name),
                "calibrated": calibrated,
                "delta_calibrated_minus_best_tap": calibrated - score if self.calibrated else None,
            }
        return {
            "net": self.net,
            "taps": list(self.tap_names),
            "categories": per_category,
            "mean_of_categories": {
                "tap_scores": [t.mean_of_categories for t in self.taps],
                "all_layers_uncalibrated": self.all_layers.mean_of_categories,
                "calibrated": self.calibrated.mean_of_categories if self.calibrated else None,
            },
            "pooled_over_triplets": {
                "tap_scores": [t.pooled for t in self.taps],
                "all_layers_uncalibrated": self.all_layers.pooled,
                "calibrated": self.calibrated.pooled if self.calibrated else None,
            },
        }


def single_layer_sweep(profile0: Any, profile1: Any, judge: Any, category: Any, channels: Sequence[int],
                       calibrated_weights: Any | None, *, category_names: Sequence[str],
                       net: str = "net", tap_names: Sequence[str] | None = None) -> SingleLayerSweep:
    """Score every single tap, the uncalibrated all-layer sum and the calibrated distance.

    Distances are `profile @ weights` in float64. The best tap is picked on the
    data given, as Rosenfeld et al. (2019, Table 2) pick it on the validation
    set. A layer chosen in advance would score lower, so this is optimistic.

    Args:
      profile0: `[T, C]` channel profile of (reference, p0), taps concatenated.
      profile1: `[T, C]` channel profile of (reference, p1).
      judge: `[T]` fraction of people who chose p1.
      category: `[T]` int codes into `category_names`, or names as strings.
      channels: `[L]` channel count of each tap, summing to C.
      calibrated_weights: `[C]` calibration weights in the same channel order,
        or None to skip the calibrated distance.
      category_names: `[K]` category names, in report order.
      net: network name for the report.
      tap_names: `[L]` tap labels (default "0", "1", ...).
    """
    profile0 = np.asarray(profile0)
    profile1 = np.asarray(profile1)
    if profile0.ndim != 2 or profile0.shape != profile1.shape:
        raise ValueError(f"profile0 and profile1 must both be [T, C], got {profile0.shape} and {profile1.shape}.")
    channels = [int(c) for c in channels]
    if sum(channels) != profile0.shape[1] or min(channels) < 1:
        raise ValueError(f"channels {channels} must be positive and sum to the profile width C = "
                         f"{profile0.shape[1]}; pass the per-tap channel counts in tap order.")
    tap_names = _default_names(tap_names, len(channels), "", "tap_names")

    columns = [lpips_lib.single_tap_weights(channels, tap) for tap in range(len(channels))]
    columns.append(lpips_lib.uncalibrated_weights(channels))
    if calibrated_weights is not None:
        calibrated_weights = np.asarray(calibrated_weights, dtype=np.float64)
        if calibrated_weights.shape != (profile0.shape[1],):
            raise ValueError(f"calibrated_weights must be [C] = [{profile0.shape[1]}], "
                             f"got {calibrated_weights.shape}.")
        columns.append(calibrated_weights)
    weights = np.stack(columns, axis=1)

    d0 = lpips_lib.distance(profile0, weights)
    d1 = lpips_lib.distance(profile1, weights)
    results = [scores_lib.two_afc_by_category(d0[:, i], d1[:, i], judge, category, category_names)
               for i in range(weights.shape[1])]
    return SingleLayerSweep(
        net=net, tap_names=tap_names, taps=tuple(results[:len(channels)]),
        all_layers=results[len(channels)],
        calibrated=results[len(channels) + 1] if calibrated_weights is not None else None)


def _format_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_single_layer_table(sweeps: Sequence[SingleLayerSweep], *, digits: int = 2) -> str:
    """Render the best single tap per category and network as Markdown.

    One row per (category, network): the best tap, its score, the calibrated
    all-layer score and delta = calibrated - best tap (positive when the
    calibration beats the best single layer). This is the layout of Table 2 in
    Rosenfeld et al. (2019). Tap indices count from 0 at the shallowest tap.
    NOTE: for SqueezeNet that paper numbers only the last five of the seven
    LPIPS taps, so its layer k is tap k + 2 here.
    """
    if not sweeps:
        raise ValueError("sweeps is empty; pass one SingleLayerSweep per network.")
    names = sweeps[0].category_names
    lines = [_format_row(["distortion", "net", "best tap", "score", "calibrated", "Δ"]),
             "|---|---|---|---|---|---|"]
    for category in names:
        for sweep in sweeps:
            if sweep.category_names != names:
                raise ValueError(f"sweep {sweep.net!r} has categories {list(sweep.category_names)}, "
                                 f"expected {list(names)}.")
            tap, score = sweep.best_tap(category)
            if sweep.calibrated is None:
                calibrated = delta = "n/a"
            else:
                calibrated = f"{sweep.calibrated.score(category):.{digits}f}"
                delta = f"{sweep.calibrated.score(category) - score:+.{digits}f}"
            lines.append(_format_row([category, sweep.net, f"{tap} ({sweep.tap_names[tap]})",
                                      f"{score:.{digits}f}", calibrated, delta]))
    return "\n".join(lines) + "\n"


def format_tap_table(sweep: SingleLayerSweep, *, digits: int = 2) -> str:
    """Render every tap's score of one network as Markdown, one row per tap plus the all-layer rows."""
    header = ["tap", *sweep.category_names, "mean of categories", "pooled over triplets"]
    lines = [_format_row(header), "|" + "---|" * len(header)]
    rows = [(f"{i} ({name})", tap) for i, (name, tap) in enumerate(zip(sweep.tap_names, sweep.taps))]
    rows.append(("all taps, uncalibrated", sweep.all_layers))
    if sweep.calibrated is not None:
        rows.append(("all taps, calibrated", sweep.calibrated))
    for label, result in rows:
        lines.append(_format_row([label, *(f"{s:.{digits}f}" for s in result.scores),
                                  f"{result.mean_of_categories:.{digits}f}", f"{result.pooled:.{digits}f}"]))
    return f"{sweep.net}\n\n" + "\n".join(lines) + "\n"


def format_combination_table(result: SubsetSearchResult, *, digits: int = 2) -> str:
    """Render the best single metric and the best combination per category as Markdown.

    One row per category, then the mean of categories and the pooled score,
    each picked separately; one pair of columns per mode. A combination has
    at least two members; gain = best combination - best single. Both are
    picked on the data searched, so they are optimistic for that data.
    """
    header = ["distortion", "best single", "score"]
    for mode in result.modes:
        header += [f"best {mode} combination", "score", "gain"]
    lines = [_format_row(header), "|" + "---|" * len(header)]
    labels = {"mean_of_categories": "mean of categories", "pooled_over_triplets": "pooled over triplets"}

    for column in result.columns():
        single = result.best(result.modes[0], column, max_size=1)
        cells = [labels.get(column, column), single.members[0], f"{single.score:.{digits}f}"]
        for mode in result.modes:
            combination = result.best(mode, column, min_size=2)
            if combination is None:
                cells += ["n/a", "n/a", "n/a"]
            else:
                cells += ["+".join(combination.members), f"{combination.score:.{digits}f}",
                          f"{combination.score - single.score:+.{digits}f}"]
        lines.append(_format_row(cells))

    near = ", ".join(f"{mode} {int(result.near_ties[mode].sum())}" for mode in result.modes)
    lines.append("")
    lines.append(f"Near-tie (subset, triplet) pairs, where float64 summation could decide otherwise: {near}.")
    return "\n".join(lines) + "\n"
